"""Leave nothing behind: a SIGTERM that exits like Ctrl-C, and reaping what a killed run left anyway:
the temporary Prefect server of a SIGKILLed flow process, and its temporary folders (`own_temp_root`,
`temp_dir`). Children that die with their parent: tasks/parent_death.py.

Without PREFECT_API_URL every flow process starts a temporary Prefect server (uvicorn) and stops it
at exit; a SIGKILL skips that, and the server lives on, re-parented to PID 1. The next run reaps
such orphans, only those of this project's PREFECT_HOME, before it starts its own work. That is
the second net: the first is `parent_death.temporary_servers_die_with_parent`, which makes the server die with
the process that started it (PR_SET_PDEATHSIG), at once, whatever killed it. (W&B's service needs
nothing: wandb-core watches its parent's pid and exits with it.)
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


def process_mark() -> dict[str, str | int | float]:
    """Who this process is, for a file that says it is working (a run's status.json): host, boot,
    pid namespace, pid and start time, so that a reader can tell when it is gone (`process_gone`)."""
    return {**_identity(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()), "marked_at": time.time()}


def _booted_after(mark: dict) -> bool | None:
    """Whether this machine booted (/proc/stat btime) after `mark` was written (its `marked_at`, else
    a run status's `started_at`); None where either time is unknown."""
    try:
        from datetime import datetime

        at = mark.get("marked_at") or datetime.fromisoformat(str(mark["started_at"])).timestamp()
        btime = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return float(btime.split()[1]) > float(at)
    except (KeyError, ValueError, TypeError, OSError, StopIteration):
        return None


def process_gone(mark: dict) -> bool | None:
    """Whether the process `process_mark` described is gone: True when it ran on this machine and
    its pid is dead or was reused (SIGKILL, the out-of-memory killer), or the machine restarted
    since; None when this reader cannot tell (another machine or container, no mark)."""
    here = _identity()
    if not mark.get("pid") or not mark.get("boot_id") or mark.get("host") != here["host"]:
        return None
    if mark["boot_id"] != here["boot_id"]:
        # Restarted since (no process survives a reboot), or another machine of the same hostname on a
        # shared S3 root, whose live run was called killed (gc stripped its checkpoints): tell them apart.
        return True if _booted_after(mark) else None
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
            # Our own child is no orphan: as PID 1 (a container's entrypoint) a run reaped its own server.
            if ppid != 1 or ppid == os.getpid() or SERVER_MARK not in (entry / "cmdline").read_bytes():
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


def descendants(*pids: int) -> dict[int, str]:
    """Every live descendant of `pids` as {pid: start time} (read from /proc, once; the start time
    tells a reused pid apart)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        starts[int(entry.name)] = fields[19]
    out, todo = {}, [child for pid in pids for child in children.get(pid, [])]
    while todo:
        child = todo.pop()
        out[child] = starts[child]
        todo += children.get(child, [])
    return out


def alive(procs: dict[int, str]) -> list[int]:
    """Which of these processes (pid -> start time, as `descendants` records them) still live: a pid
    the kernel reused for another process does not count."""
    live = []
    for pid, start in procs.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            live.append(pid)
    return live


def with_start_times(pids) -> dict[int, str]:
    """{pid: start time} of those of `pids` that run, as `descendants` gives them."""
    return {pid: start for pid in pids if (start := _start_time(pid)) and _running(pid)}


def processes_with_environ(name: str, value: str) -> list[int]:
    """Live processes whose environment has name=value (those this user may read)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if _environ(int(pid)).get(name.encode()) == value.encode() and _running(int(pid)):
                found.append(int(pid))
        except OSError:
            continue
    return found


def stop_processes(procs: dict[int, str], grace: float = 2, kill_after: float = 2,
                   reap: float = 5) -> tuple[list[int], list[int]]:
    """Wait up to `grace` s for these processes ({pid: start time}, as `descendants` gives them) to
    exit by themselves; SIGTERM those left, SIGKILL whatever still runs `kill_after` s later, and wait
    up to `reap` s for that. Returns (the pids it had to signal, the pids still running at the end:
    a process in uninterruptible sleep outlives even SIGKILL for as long as its system call lasts)."""
    signalled: list[int] = []
    for sig, wait in ((None, grace), (signal.SIGTERM, kill_after), (signal.SIGKILL, reap)):
        for pid in alive(procs) if sig else ():
            try:
                os.kill(pid, sig)
                signalled.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive(procs):
            break
    return list(dict.fromkeys(signalled)), alive(procs)


def processes_using(folder: str) -> list[int]:
    """Live processes that name `folder` on their command line or hold a file under it open: Ray's
    agents and workers rename themselves (ray::IDLE), but keep their log files open."""
    found = set(processes_under(folder))
    inside = folder.rstrip("/") + "/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) not in found and any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(inside)
                                             for fd in os.listdir(f"/proc/{pid}/fd")) and _running(int(pid)):
                found.add(int(pid))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(found)


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
    folder = tempfile.mkdtemp(prefix=f"smolflow-tmp-{os.getpid()}-{_pid_ns()}-", dir=root)
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    tempfile.tempdir = folder
    return folder


def _pid_ns() -> str:
    """This process's pid namespace (its inode), "" if unknown: a pid means a process only in it."""
    return "".join(filter(str.isdigit, _identity()["pid_ns"]))


def _reap(root: Path, mark: str) -> None:
    """Remove root's folders named <mark><pid>-<pid namespace>-... whose process is gone. A temp
    folder shared by containers (another pid namespace: its pids are not in our /proc) held live
    runs' folders: one run deleted another's while it ran, and W&B failed on its missing files."""
    here = _pid_ns()
    for path in root.glob(mark + "*"):
        parts = path.name[len(mark):].split("-")  # pid, namespace, mkdtemp's letters (no "-" in them)
        pid, ns = parts[0], parts[1] if len(parts) == 3 else ""  # 2 parts: named before the namespace was
        if ns not in ("", here):
            continue  # another pid namespace's: its own runs reap it
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A throwaway folder named after this process (smolflow-<kind>-<pid>-...), removed on exit as
    any; one whose process is gone (SIGKILLed: no cleanup ran) is removed when the next is made."""
    mark = f"smolflow-{kind}-"
    _reap(Path(tempfile.gettempdir()), mark)
    return tempfile.TemporaryDirectory(prefix=f"{mark}{os.getpid()}-{_pid_ns()}-")
