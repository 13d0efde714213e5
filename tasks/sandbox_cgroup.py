"""The cgroup (v1 memory + pids) that bounds one sandboxed program and everything it forks, as a
whole: per-process rlimits alone let N processes hold N times the memory. Made below smolflow's own
cgroups, so whatever bounds smolflow bounds the sandbox too; emptied and removed after each program
(tasks/sandbox.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tasks.leftovers import _running

_CGROUPS = Path(os.environ.get("SMOLFLOW_CGROUP_ROOT", "/sys/fs/cgroup"))


def cgroup_dirs(name: str) -> list[Path]:
    """The cgroup v1 memory and pids folders for one sandbox, below this process's own cgroups
    (so whatever bounds smolflow bounds the sandbox too); [] where they cannot be made."""
    own = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text(encoding="utf-8").splitlines())
    dirs = []
    try:
        for controller in ("memory", "pids"):
            parent = _CGROUPS / controller / own.get(controller, "/").lstrip("/")
            for stale in parent.glob("smolflow-sandbox-*"):  # a SIGKILLed run's: what it left dies with it
                pid = stale.name.split("-")[2]
                if pid.isdigit() and not _running(int(pid)):
                    cgroup_remove([stale], wait_s=1, quiet=True)
            dirs.append(parent / name)
            dirs[-1].mkdir()
    except OSError:  # no v1 controller here, or a read-only cgroup filesystem (a container)
        cgroup_remove([d for d in dirs if d.exists()])
        return []
    return dirs


def cgroup_limit(dirs: list[Path], limits, extra_processes: int) -> str:  # limits: tasks.sandbox.Limits
    """Memory (the program's processes and its tmpfs together) and pids for the whole sandbox."""
    memory = (limits.memory_mb + limits.disk_mb) << 20
    (dirs[0] / "memory.limit_in_bytes").write_text(str(memory))
    try:
        (dirs[0] / "memory.memsw.limit_in_bytes").write_text(str(memory))  # no escape into swap
    except OSError:
        pass  # swap accounting off
    (dirs[1] / "pids.max").write_text(str(limits.processes + extra_processes))
    return f"cgroup memory {limits.memory_mb + limits.disk_mb} MiB + pids {limits.processes}"


def cgroup_remove(dirs: list[Path], wait_s: float = 10, quiet: bool = False) -> None:
    """Kill everything still in the cgroups (until none is left: it may still be forking), then remove them."""
    deadline = time.monotonic() + wait_s
    for d in dirs:
        while d.exists():
            try:
                pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                d.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    if quiet:
                        break
                    raise RuntimeError(f"sandbox cgroup {d} still busy after {wait_s} s; remove it by hand") from None
                time.sleep(0.02)


def join(dirs: list[Path]):
    """Between fork and exec: move this process into the sandbox's cgroups."""
    for d in dirs:
        (d / "cgroup.procs").write_text(str(os.getpid()))


def oom_kills(dirs: list[Path]) -> int:
    """How many processes the cgroup's OOM killer took (PID 1 may be one: then no status file)."""
    for line in (dirs[0] / "memory.oom_control").read_text().splitlines() if dirs else ():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0
