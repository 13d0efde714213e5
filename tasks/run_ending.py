"""A run that must end does, even where the exception that ends it is caught.

Prefect ends a flow run past its `timeout_seconds` (SMOLFLOW_RUN_TIMEOUT_HOURS) with one SIGALRM
that raises its CancelledError wherever the flow's code is, and a cancel or a stop (SIGTERM) with
one TerminationSignal, the same way. Code that catches it there and goes on (measured: W&B's
`config.update` and `log` in 2-3 of 150 tries) leaves the run going: under load a run with a 10.8 s
limit was still training 10 minutes later, and a test that waited for it killed it holding the
shared test server's training slot, which stalled every later training (CI hung). So the flow's
block is watched: GRACE_S past the limit, or STOP_GRACE_S after a SIGTERM, the same exception is
raised in the flow's thread again, every AGAIN_S, until the block is left; not inside the clean-up
that the exception is already going through (`finishing`), but after it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tasks.runtime import RUN_TIMEOUT_ENV, run_logger

GRACE_S = 30.0  # the first one, and the code it interrupted, get this long to end the block
# A stop's first exception gets less: Prefect's runner SIGKILLs a cancelled run 30 s after its SIGTERM
# (Docker's stop: 10 s), and a stop caught in W&B's callbacks as training began was raised again as the
# SIGKILL came, which left status.json saying 'running' (CI). The clean-up the stop goes through is
# not cut short by it (`finishing`).
STOP_GRACE_S = 8.0
AGAIN_S = 5.0  # caught again: raised again
LAND_S = 0.05  # a dropped one is raised again this much later: once the code that dropped it has returned


def _flow_timeout() -> float | None:
    """The running flow's timeout_seconds (SMOLFLOW_RUN_TIMEOUT_HOURS), None outside a flow or without one."""
    from prefect.context import FlowRunContext

    return getattr(getattr(FlowRunContext.get(), "flow", None), "timeout_seconds", None)


def _raise_in(thread_id: int, exc_type: type[BaseException]) -> None:
    """exc_type raised in that thread at its next Python instruction."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))


class _Withdrawn(BaseException):
    """Put in place of a pending exception, and caught, as the block ends."""


def _landing() -> None:
    """A Python call (and loop): a pending exception of this thread is raised here."""
    for _ in range(1_000_000):
        pass


class StoppedAgain(BaseException):
    """Base of the SIGTERM raised again (a subclass of Prefect's TerminationSignal, made per run)."""


_noted: Callable[[], bool] | None = None  # the running block's, while one runs

# Threads inside `finishing()` blocks: one token each per block, its deadline (list.append and
# .remove are single calls, so an exception landing around them leaves no count wrong). The watcher
# raises into none of them before the deadline; `_finishing_lock` makes its check and its raise one
# step against a block being entered.
_finishing: dict[int, list[list[float]]] = {}
_finishing_lock = threading.Lock()


@contextmanager
def finishing(within_s: float = 60.0) -> Iterator[None]:
    """Clean-up of a stop already under way (stopping a local Ray cluster, dropping a checkpoint): the
    stop raised again every AGAIN_S is not raised inside it but after it, or once it has run
    `within_s` (a clean-up that hangs does not keep the run going). A stop dropped by a fork
    (ray.init() starting its processes) is raised again at once and every AGAIN_S; the first ended
    ray.init(), the second landed in the clean-up after it, 5 s later on a loaded machine, which
    then left the cluster's session folder behind (CI). A SIGTERM still lands as ever."""
    me, token = threading.get_ident(), [time.monotonic() + within_s]
    try:
        with _finishing_lock:
            _finishing.setdefault(me, []).append(token)
        yield
    finally:
        with _finishing_lock, contextlib.suppress(ValueError):
            _finishing[me].remove(token)
            if not _finishing[me]:
                del _finishing[me]


# A fork runs logging's at-fork hooks (`before`: take logging's module lock; `after_in_parent`:
# release it) as Python functions called from C, which prints any exception they raise and drops
# it. A SIGTERM that arrives during the fork runs Prefect's handler at the entry of the release
# hook: its TerminationSignal was lost and the lock stayed taken by the flow's thread, so every other
# thread that logged (Prefect's log and event workers, the thread a Prefect future starts) waited
# for it for good (a run stopped while ray.init() forked Ray's processes hung; the HumanEval
# sandbox and training ranks fork too). So after each fork the lock is released down to what the
# forking thread held before it; the stop dropped so is raised again by the running block (its
# `unraisable` hook, through which Python reports what it dropped).
_held = threading.local()
_forks_guarded = False


def _before_fork() -> None:
    _held.count = logging._lock._recursion_count()  # 0 unless this thread holds it (a handler that forks)


def _after_fork_in_parent() -> None:
    held = getattr(_held, "count", None)
    _held.count = None
    if held is None:  # this hook's `before` did not run to its end: nothing known to put right
        return
    while logging._lock._recursion_count() > held:
        logging._lock.release()


def guard_forks() -> None:
    """Register the hooks above, once per process, after logging's: `before` hooks run in reverse
    order of registration (this one before logging takes its lock), `after_in_parent` hooks in order
    (this one after logging's release, or its interrupted attempt)."""
    global _forks_guarded
    if _forks_guarded or not hasattr(os, "register_at_fork") or not hasattr(logging._lock, "_recursion_count"):
        return
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)
    _forks_guarded = True


def stop_noted() -> bool:
    """Whether a SIGTERM has come during the running flow's block (False outside one). For code
    whose exceptions native libraries rewrap (Ray's wait: a SystemError; pydantic's serializer: its
    own error naming it), where the TerminationSignal itself may be lost."""
    return _noted() if _noted is not None else False


@contextmanager
def ending_enforced() -> Iterator[None]:
    """The block (a flow's body) ends by Prefect's own exception once it runs GRACE_S past the
    flow's timeout or STOP_GRACE_S past a SIGTERM, however often the code that exception lands in catches it."""
    from prefect._internal.concurrency.cancellation import CancelledError  # what Prefect's timeout raises
    from prefect.exceptions import TerminationSignal  # what Prefect's SIGTERM handler raises

    class StopSignal(TerminationSignal, StoppedAgain):
        def __init__(self):
            super().__init__(signal=signal.SIGTERM)

    seconds, flow_thread, began = _flow_timeout(), threading.get_ident(), time.monotonic()
    left, lock = threading.Event(), threading.Lock()
    due: dict[str, float] = {}
    if seconds:
        due["timeout"] = time.monotonic() + seconds + GRACE_S
    # A SIGTERM is noticed by the signal module's wakeup fd (its C handler writes the signal's number
    # there), not by a handler of ours: Prefect acknowledges a cancel only while its own handler is
    # the one installed (else the run ends Crashed, not Cancelled).
    notes, note_to = socket.socketpair()
    notes.setblocking(False)
    note_to.setblocking(False)
    try:
        before_fd = signal.set_wakeup_fd(note_to.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main thread: no signal comes to it
        before_fd = None

    reading = threading.Lock()
    dropped: list[bool] = []
    kick = threading.Event()  # dropped again: raise it again now

    def resend(kind: str = "stop") -> None:
        """A stop (or timeout) Python dropped where it landed: raised again LAND_S later, from the
        watcher. Only in the flow's thread: signals, and the exceptions raised again, land there alone."""
        if threading.get_ident() != flow_thread:
            return
        dropped.append(True)
        due[kind] = time.monotonic() + LAND_S
        kick.set()  # wakes the watcher raising it again already
        with contextlib.suppress(OSError):
            note_to.send(b"\0")  # wakes the watcher

    interrupted: list[bool] = []  # a SIGINT (Ctrl-C) has come: not raised again, only noted

    def noted() -> bool:
        """Whether a SIGTERM has come during the block (what the wakeup fd holds read first)."""
        with reading, contextlib.suppress(OSError):  # BlockingIOError: nothing new
            came = notes.recv(4096)
            if signal.SIGTERM in came:
                due.setdefault("stop", time.monotonic() + STOP_GRACE_S)
            if signal.SIGINT in came:
                interrupted.append(True)
        return "stop" in due

    def watch() -> None:
        while not left.is_set():
            when = min(due.values(), default=None)
            if when is None or time.monotonic() < when:
                wait = 1.0 if when is None else min(1.0, max(0.0, when - time.monotonic()))
                if select.select([notes], [], [], wait)[0]:
                    noted()
                continue
            why = "SIGTERM" if due.get("stop", float("inf")) <= due.get("timeout", float("inf")) else (
                f"{RUN_TIMEOUT_ENV} ({seconds:g} s)")
            if dropped:
                run_logger().warning("The exception that ends the run was dropped where it landed (printed above as "
                                     "'Exception ignored in'): raised again every %g s until the run ends", AGAIN_S)
            else:
                run_logger().warning("The run is %g s past its %s and still running: the exception that ends it was "
                                     "caught where it landed; raised again every %g s until the run ends",
                                     STOP_GRACE_S if why == "SIGTERM" else GRACE_S, why, AGAIN_S)
            while True:
                with lock, _finishing_lock:
                    if left.is_set():
                        return
                    # raised once that clean-up is done, or past its time
                    deferred = any(until > time.monotonic() for (until,) in _finishing.get(flow_thread, ()))
                    if not deferred:
                        kick.clear()
                        _raise_in(flow_thread, StopSignal if why == "SIGTERM" else CancelledError)
                if kick.wait(min(0.2, AGAIN_S) if deferred else AGAIN_S):  # dropped again, or the block left
                    time.sleep(LAND_S)

    # Python code that C calls and whose exception it cannot pass on (a weakref callback, __del__, a
    # fork's hooks) prints the exception ("Exception ignored in") and drops it; a signal handler runs
    # at the entry of such code too. Measured: 1 of 10 SIGTERMs as training began was dropped in a
    # WeakKeyDictionary's callback, and the run trained on until the stop was raised again.
    before_hook = sys.unraisablehook

    def unraisable(info) -> None:
        before_hook(info)  # first: raised again while this hook ran, it was dropped with it (seen)
        if isinstance(info.exc_value, TerminationSignal):
            resend("stop")
        elif isinstance(info.exc_value, CancelledError) and seconds and time.monotonic() >= began + seconds:
            resend("timeout")  # Prefect's own, past the flow's timeout: not one of its internal cancel scopes

    global _noted
    guard_forks()
    watcher = threading.Thread(target=watch, name="smolflow-run-ending", daemon=True)
    watcher.start()
    outer, _noted = _noted, noted
    sys.unraisablehook = unraisable
    try:
        yield
    except Exception as err:
        # Any error once a SIGTERM (or Ctrl-C) has come is the stop's: a stop that lands in an import
        # (trl's, as training began) and is caught there leaves modules half-initialised, and the next
        # import fails in its own words ("partially initialized module 'pandas'...", CI). The run ends
        # as stopped (interrupted), that error its cause.
        if noted():
            raise StopSignal() from err
        if interrupted:
            raise KeyboardInterrupt() from err
        raise
    finally:
        _noted = outer
        if sys.unraisablehook is unraisable:  # else someone set theirs meanwhile: theirs stays
            sys.unraisablehook = before_hook
        # Nothing is raised in this thread once it has left the block: one still pending is replaced
        # by one raised and caught here. Not withdrawn (SetAsyncExc(NULL)): that leaves CPython's
        # pending-exception flag set with nothing to raise, and a thread under a profiler or tracer
        # (cProfile, coverage, a debugger) then spins at its next call for good (3.11: the run hung).
        while True:
            try:
                left.set()
                kick.set()  # the watcher, if raising again, sees `left` now
                with lock:  # the watcher raises only under it, after checking `left`
                    _raise_in(flow_thread, _Withdrawn)
                _landing()
                break  # not reached: it lands in _landing
            except _Withdrawn:
                break
            except (CancelledError, StoppedAgain):  # it came as the block was ending anyway
                continue
        if before_fd is not None and (current := signal.set_wakeup_fd(before_fd)) != note_to.fileno():
            signal.set_wakeup_fd(current)  # someone set theirs meanwhile: theirs stays
        with contextlib.suppress(OSError):
            note_to.send(b"\0")  # wakes the watcher, which sees `left`
        # Bounded: a watcher stuck in logging (its module lock left taken by a stop dropped in a fork's
        # hooks where the guard is not registered) would hold the run here for good; it raises nothing now.
        watcher.join(timeout=10)
        notes.close()
        note_to.close()
