"""Children that die with their parent (Linux PR_SET_PDEATHSIG), even when it is SIGKILLed (the
out-of-memory killer): HumanEval's sandboxed programs, training ranks, the local Prefect server of
`smolflow serve`, and Prefect's temporary server of a run without PREFECT_API_URL (which Prefect
starts itself: `temporary_servers_die_with_parent`). What a kill leaves anyway is reaped by the
next run (tasks/leftovers.py)."""

from __future__ import annotations

import functools
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future


@functools.cache
def _prctl():
    """libc's prctl, or None off Linux. Looked up in the parent: a child forked from a process with
    threads should do as little as it can before exec (no dlopen, no import)."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Linux: send this process `sig` when its parent dies, even by SIGKILL (call it in the child,
    e.g. as Popen's preexec_fn). `parent`: exit now if that parent already died before the call.
    The kernel's "parent" is the *thread* that forked: the signal comes when that thread ends, even
    while its process lives on. Fork from a thread that lasts (`from_lasting_thread`)."""
    if (prctl := _prctl()) is not None:
        prctl(1, sig)  # 1 = PR_SET_PDEATHSIG; kept across exec (not across a uid switch)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


_spawner: tuple[int, queue.SimpleQueue] | None = None  # (pid it serves, its queue of jobs)
_spawner_lock = threading.Lock()


def from_lasting_thread(fn):
    """fn() run by a thread that lasts as long as this process: the main thread, else one started
    for this. A child given PR_SET_PDEATHSIG by a short-lived thread (a thread pool's, an event
    loop's: Prefect's events worker can be the first to start its server) would be killed when that
    thread ends, while the process still uses it."""
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():  # none yet, or a forked child's copy
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=_run_jobs, args=(jobs,), name="smolflow-spawner", daemon=True).start()
            _spawner = (os.getpid(), jobs)
        jobs = _spawner[1]
    done: Future = Future()
    jobs.put((fn, done))
    return done.result()


def _run_jobs(jobs: queue.SimpleQueue) -> None:
    while True:  # never returns: its children's PR_SET_PDEATHSIG fires when the process ends
        fn, done = jobs.get()
        try:
            done.set_result(fn())
        except BaseException as err:  # noqa: BLE001 - the caller's to raise
            done.set_exception(err)


# Sets the parent-death signal, then becomes the command (exec keeps it). A Python preexec_fn would
# do it without the extra exec, but it makes Popen fork (not vfork) a process full of threads and run
# Python in the child before exec, which the subprocess docs warn can deadlock; Popen then never returns.
_EXEC_DYING = ("import ctypes, os, sys\n"
               "ctypes.CDLL(None).prctl(1, int(sys.argv[1]))\n"  # 1 = PR_SET_PDEATHSIG
               "if os.getppid() != int(sys.argv[2]):\n    os._exit(1)\n"  # it died before that line
               "os.execv(sys.argv[3], sys.argv[3:])\n")


def popen_dying_with_parent(args, *rest, sig: int = signal.SIGTERM, **kwargs) -> subprocess.Popen:
    """subprocess.Popen, the child getting `sig` when this process dies (SIGKILL, out of memory)."""
    if _prctl() is None or rest or kwargs.get("shell") or "executable" in kwargs or not isinstance(args, (list, tuple)):
        return subprocess.Popen(args, *rest, **kwargs)  # off Linux, or a call this wrapper does not read
    command = shutil.which(str(args[0])) or str(args[0])
    wrapped = [sys.executable, "-I", "-S", "-c", _EXEC_DYING, str(int(sig)), str(os.getpid()), command, *map(str, args[1:])]
    return from_lasting_thread(lambda: subprocess.Popen(wrapped, **kwargs))


SERVER_MODULE = "prefect.server.api.server"


class _ServerSubprocess:
    """`subprocess` as SERVER_MODULE sees it: its Popen (SubprocessASGIServer._run_uvicorn_command,
    the temporary server's only start) is `popen_dying_with_parent`; the rest is subprocess's.
    SIGTERM: the server stops as Prefect's own `stop` stops it, its database left tidy."""

    Popen = staticmethod(popen_dying_with_parent)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


class _PatchOnImport:
    """A meta path finder that patches SERVER_MODULE when it is imported: importing it only to patch
    it would cost ~1.6 s to every process that never starts a temporary server."""

    def find_spec(self, name, path, target=None):
        if name != SERVER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    load = spec.loader.exec_module

                    def exec_module(module, load=load) -> None:
                        load(module)
                        _patch_server_module(module)

                    spec.loader.exec_module = exec_module  # this spec's own loader
                    return spec
        return None


def _patch_server_module(module) -> None:
    if not isinstance(getattr(module, "subprocess", None), _ServerSubprocess):
        module.subprocess = _ServerSubprocess()


def temporary_servers_die_with_parent() -> None:
    """Every temporary Prefect server this process starts from now on dies with it. Prefect 3.9's
    SubprocessASGIServer starts it with a plain Popen and has no hook nor setting for this, so the
    module's `subprocess` is swapped (`_ServerSubprocess`). A SIGKILL of the process (the out-of-
    memory killer) left the server running, re-parented to PID 1, until the next run reaped it
    (`reap_orphaned_servers`, kept as the second net). Idempotent; `import tasks` calls it."""
    if (module := sys.modules.get(SERVER_MODULE)) is not None:
        _patch_server_module(module)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
