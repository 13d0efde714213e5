"""A killed run's local Ray cluster, stopped at once instead of a minute later.

A run's GCS and raylet die with it even when it is SIGKILLed (Ray fate-shares them with the driver),
its workers seconds later; but the raylet's dashboard and runtime-env agents, orphaned, first try
for 60 s to tell the dead GCS that the raylet died (ray 2.60: `publish_error_to_driver`'s fixed
timeout) and keep the session folder's logs open meanwhile. So before ray.init() the run starts this
watchdog (`guarding`): a small process that waits on a pipe only the run holds. End of file (the
run is gone however it ended, or it closed the pipe once it had stopped its cluster itself) -> it
stops whatever still holds or names a session folder of the run started since, removes the folder,
and exits. The next run's `reap_sessions` stays the net for what this misses (the watchdog killed
too, a reboot)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from tasks.leftovers import processes_using, stop_processes, with_start_times

# A run about to start a local cluster notes itself first, in the folder its session will be in
# (tasks/ray_scoring.py): Ray names the session folder session_<local time>_<driver pid>.
STARTING = ".smolflow-starting-{pid}.json"


def remove_session(session: Path) -> None:
    """The session folder, and Ray's link to it as the latest."""
    shutil.rmtree(session, ignore_errors=True)
    latest = session.parent / "session_latest"
    if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
        latest.unlink(missing_ok=True)


def sessions_of(root: Path, pid: int) -> set[Path]:
    """Session folders under `root` of local clusters that process `pid` started."""
    return {p for p in root.glob(f"session_*_{pid}") if not p.is_symlink()}


def clear(root: Path, pid: int, earlier: set[Path]) -> list[int]:
    """Stop what holds a session folder of `pid` newer than `earlier`, remove it; the stopped pids."""
    stopped = []
    for session in sorted(sessions_of(root, pid) - earlier):
        signalled, left = stop_processes(with_start_times(processes_using(str(session))), grace=0.5)
        stopped += signalled
        if not left:
            remove_session(session)
    return stopped


def watch(root: Path, pid: int) -> None:
    """The watchdog's body: note the sessions `pid` has now, say so, wait for end of file, clear."""
    earlier = sessions_of(root, pid)
    print("watching", flush=True)
    sys.stdin.buffer.read()
    stopped = clear(root, pid, earlier)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # the run died: its note too (a run that lives removes its own)
        (root / STARTING.format(pid=pid)).unlink(missing_ok=True)
    if stopped:
        try:  # to the run's stderr, which may have closed with it
            print(f"stopped {len(stopped)} process(es) of the local Ray cluster of process {pid}: pids {stopped}",
                  file=sys.stderr, flush=True)
        except OSError:
            pass


@contextmanager
def guarding(root: Path):
    """A watchdog for the local cluster this process starts inside the block; it clears what the
    block left (nothing, when the block stopped its cluster itself) as the block ends or when this
    process dies, whichever comes first. Without a watchdog (it could not start) the block runs as
    before."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    try:
        dog = subprocess.Popen([sys.executable, "-m", "tasks.ray_watchdog", str(root), str(os.getpid())],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
    except OSError:
        dog = None
    try:
        if dog is not None and dog.stdout.readline() != b"watching\n":  # died at start: nothing to guard with
            dog.wait()
            dog = None
        yield dog
    finally:
        if dog is not None:
            dog.stdin.close()  # end of file: clear, exit
            try:
                dog.wait(timeout=15)
            except subprocess.TimeoutExpired:
                dog.kill()
                dog.wait()


if __name__ == "__main__":
    watch(Path(sys.argv[1]), int(sys.argv[2]))
