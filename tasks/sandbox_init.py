"""The sandbox's first process: PID 1 of a fresh PID namespace, still root (stdlib only; run with
`python -I -S -B`, never imported).

`tasks/sandbox.py` starts it as `unshare --pid --fork --kill-child --mount-proc --mount --net --
python sandbox_init.py KEY=VALUE... -- ENV...` (plain arguments, not JSON: importing json costs
more than the rest of this start-up): it is then alone in new PID, mount and network namespaces with a
/proc that shows only its own tree. It mounts one size-capped tmpfs over /tmp (the program's work
dir and every world-writable place live on it, so all the program writes together is capped and
nothing reaches the host's disk), starts the program under its own uid with rlimits, waits for it,
and writes how it ended to the status file. When it exits, the kernel kills whatever the program
left in the namespace. Being root and the program's parent, it cannot be signalled by the program.
"""

import ctypes
import os
import resource
import sys

_MS_NOSUID, _MS_NODEV, _MS_BIND = 0x2, 0x4, 0x1000
# World-writable places besides /tmp: each becomes a folder of the same tmpfs, so one cap covers all.
_ALSO_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock")
WORK = "/tmp/work"


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


def setup(spec: dict) -> str:
    """The tmpfs and the program on it; returns the program's path."""
    _own_namespaces(spec)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(spec["program"], encoding="utf-8") as f:  # read before /tmp (where it lies) is covered
        source = f.read()
    _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={spec['disk_mb']}m,mode=1777")
    for place in _ALSO_WRITABLE:
        if os.path.isdir(place):
            inside = "/tmp/." + place.strip("/").replace("/", "_")
            os.mkdir(inside, 0o1777)
            os.chmod(inside, 0o1777)  # mkdir's mode is cut by the umask
            _mount(libc, inside, place, None, _MS_BIND, None)
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
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])
        os.chdir(WORK)
        os.execve(spec["python"], [spec["python"], "-I", "-B", program], spec["env"])
    except BaseException as err:  # noqa: BLE001 - anything here is a setup failure
        status.write(f"setup could not start the program: {err}\n")
        status.flush()
    os._exit(125)


def parse(argv: list[str]) -> dict:
    """KEY=VALUE arguments, then `--`, then the program's environment as KEY=VALUE."""
    cut = argv.index("--")
    spec = dict(a.split("=", 1) for a in argv[:cut])
    for key in ("uid", "disk_mb", "memory_mb", "cpu_s", "file_mb", "processes", "host_mnt", "host_net"):
        spec[key] = int(spec[key])
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
