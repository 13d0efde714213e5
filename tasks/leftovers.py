"""Leave nothing behind: children that die with their parent, a SIGTERM that exits like Ctrl-C, and
reaping what a killed run left anyway: the temporary Prefect server of a SIGKILLed flow process, and
its temporary folders (`own_temp_root`, `temp_dir`).

Without PREFECT_API_URL every flow process starts a temporary Prefect server (uvicorn) and stops it
at exit; a SIGKILL skips that, and the server lives on, re-parented to PID 1. The next run reaps
such orphans, only those of this project's PREFECT_HOME, before it starts its own work. (W&B's
service needs nothing: wandb-core watches its parent's pid and exits with it.)
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

SERVER_MARK = b"prefect.server.api.server:create_app"


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Linux: send this process `sig` when its parent dies, even by SIGKILL (call it in the child,
    e.g. as Popen's preexec_fn). `parent`: exit now if that parent already died before the call."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: no such safety net
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP (`kill`, a closed terminal) end the process as Ctrl-C does: by an
    exception, so `finally` blocks and atexit hooks run (the temporary Prefect server is stopped).
    Their default action kills the process on the spot, and Prefect re-raises SIGTERM with the
    handler it found when a flow run ends on one: this one."""

    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _identity() -> dict[str, str]:
    """This machine, boot and pid namespace: where a pid means the same process."""
    def read(path: str, how=Path.read_text) -> str:
        try:
            return str(how(Path(path))).strip()
        except OSError:
            return ""
    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": read("/proc/self/ns/pid", Path.readlink)}


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if none): with the pid, one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_mark() -> dict[str, str | int]:
    """Who this process is, for a file that says it is working (a run's status.json): host, boot,
    pid namespace, pid and start time, so that a reader can tell when it is gone (`process_gone`)."""
    return {**_identity(), "pid": os.getpid(), "pid_start": _start_time(os.getpid())}


def process_gone(mark: dict) -> bool | None:
    """Whether the process `process_mark` described is gone: True when it ran on this machine and
    its pid is dead or was reused (SIGKILL, the out-of-memory killer), or the machine restarted
    since; None when this reader cannot tell (another machine or container, no mark)."""
    here = _identity()
    if not mark.get("pid") or not mark.get("boot_id") or mark.get("host") != here["host"]:
        return None
    if mark["boot_id"] != here["boot_id"]:
        return True  # same machine, restarted since: no process survives a reboot
    if mark.get("pid_ns") != here["pid_ns"]:
        return None  # another container on this kernel: its pids are not ours to read
    pid = int(mark["pid"])
    return not (_running(pid) and _start_time(pid) == str(mark.get("pid_start")))


def _environ(pid: int) -> dict[bytes, bytes]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)


def orphaned_servers(prefect_home: str | None = None) -> list[int]:
    """Pids of temporary Prefect servers whose parent died (now PID 1's) and whose PREFECT_HOME is ours.
    Temporary: Prefect starts those with PREFECT__SERVER_EPHEMERAL=1; a server someone started with
    `prefect server start --background` looks the same otherwise (PID 1's too) and is theirs to stop."""
    home = (prefect_home if prefect_home is not None else os.environ.get("PREFECT_HOME", "")).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[1])
            if ppid != 1 or SERVER_MARK not in (entry / "cmdline").read_bytes():
                continue
            environ = _environ(int(entry.name))
            if environ.get(b"PREFECT_HOME", b"") == home and environ.get(b"PREFECT__SERVER_EPHEMERAL") == b"1":
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return found


def reap_orphaned_servers(prefect_home: str | None = None, timeout: float = 10) -> list[int]:
    """SIGTERM (then SIGKILL) the orphaned temporary servers of this PREFECT_HOME; their pids."""
    pids = orphaned_servers(prefect_home)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout / 2
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
    if pids:
        from tasks.runtime import run_logger

        run_logger().warning("Stopped %d temporary Prefect server(s) left by a killed run: pids %s", len(pids), pids)
    return pids


def processes_under(folder: str) -> list[int]:
    """Live processes whose command line names `folder` (read from /proc: `ps` cuts long lines)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if folder.encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and _running(int(pid)):
                found.append(int(pid))
        except OSError:
            continue
    return found


def own_temp_root() -> str:
    """Point this process's temporary files (tempfile's, so every library's) into a folder of its own,
    smolflow-tmp-<pid>-..., removed at exit; one whose process is gone is removed now. A SIGKILL skips
    every cleanup: without this, wandb's import-time folders (tmp*wandb-media, tmp*wandb-artifacts)
    and whatever lm-eval or datasets had open would stay in $TMPDIR for good. Call it first thing,
    before wandb is imported. In-process only (not $TMPDIR): children that import smolflow get their
    own; a forked child that exits through atexit does not remove its parent's."""
    current = tempfile.gettempdir()
    if Path(current).name.startswith(f"smolflow-tmp-{os.getpid()}-"):
        return current  # already ours (the CLI runs the flow in its own process)
    root = Path(current)
    if root.name.startswith("smolflow-tmp-"):
        root = root.parent  # a forked child: a folder of its own beside its parent's
    _reap(root, "smolflow-tmp-")
    folder = tempfile.mkdtemp(prefix=f"smolflow-tmp-{os.getpid()}-", dir=root)
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    tempfile.tempdir = folder
    return folder


def _reap(root: Path, mark: str) -> None:
    """Remove root's folders named <mark><pid>-... whose process is gone."""
    for path in root.glob(mark + "*"):
        pid = path.name[len(mark):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A throwaway folder named after this process (smolflow-<kind>-<pid>-...), removed on exit as
    any; one whose process is gone (SIGKILLed: no cleanup ran) is removed when the next is made."""
    mark = f"smolflow-{kind}-"
    _reap(Path(tempfile.gettempdir()), mark)
    return tempfile.TemporaryDirectory(prefix=f"{mark}{os.getpid()}-")
