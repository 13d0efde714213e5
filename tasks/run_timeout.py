"""SMOLFLOW_RUN_TIMEOUT_HOURS, enforced even where Prefect's own timeout is lost.

Prefect ends a flow run past its `timeout_seconds` once: a SIGALRM (or, off the main thread, an
exception sent to the flow's thread) raises its CancelledError wherever the flow's code is at that
moment. Code that catches it there and goes on (a library's `except asyncio.CancelledError`, which
Prefect's CancelledError subclasses; seen under load: a run landed in training setup and trained
on for good) leaves the run without a limit: a hung nightly holds its slot for ever, and a test
that waited for it killed it holding the shared server's training slot, which stalled every later
training (CI hung). So the flow's block is watched as well: past the limit plus GRACE_S, the same
CancelledError is raised in the flow's thread again, every AGAIN_S, until the block is left.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tasks.runtime import RUN_TIMEOUT_ENV, run_logger

GRACE_S = 30.0  # Prefect's own timeout and the code it interrupted get this long to end the block
AGAIN_S = 5.0  # caught again: raised again


def _flow_timeout() -> float | None:
    """The running flow's timeout_seconds (SMOLFLOW_RUN_TIMEOUT_HOURS), None outside a flow or without one."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return getattr(getattr(ctx, "flow", None), "timeout_seconds", None)


def _raise_in(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """exc_type raised in that thread at its next Python instruction (None: a pending one withdrawn)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                              ctypes.py_object(exc_type) if exc_type is not None else None)


@contextmanager
def timeout_enforced() -> Iterator[None]:
    """The block (a flow's body) ends by Prefect's CancelledError once it runs past the flow's timeout
    plus GRACE_S, however often the code it interrupts catches that."""
    seconds = _flow_timeout()
    if not seconds:
        yield
        return
    from prefect._internal.concurrency.cancellation import CancelledError  # what Prefect's timeout raises

    flow_thread, left, lock = threading.get_ident(), threading.Event(), threading.Lock()
    deadline = time.monotonic() + seconds + GRACE_S

    def watch() -> None:
        if left.wait(max(0.0, deadline - time.monotonic())):
            return
        run_logger().warning("The run is past its %s (%g s) and still running: Prefect's timeout was caught by "
                             "the code it interrupted; ending the run again", RUN_TIMEOUT_ENV, seconds)
        while True:
            with lock:
                if left.is_set():
                    return
                _raise_in(flow_thread, CancelledError)
            if left.wait(AGAIN_S):
                return

    watcher = threading.Thread(target=watch, name="smolflow-run-timeout", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        while True:  # nothing is raised in this thread once it has left the block
            try:
                left.set()
                with lock:  # the watcher raises only under it, after checking `left`
                    _raise_in(flow_thread, None)  # one pending is withdrawn
                break
            except CancelledError:  # it came as the block was ending anyway
                continue
