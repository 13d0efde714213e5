"""Machine-wide (or server-wide) mutual exclusion for smolflow's critical sections.

`exclusive(name)` always holds an flock(2) file lock under SMOLFLOW_CACHE/locks (every process
on this machine, served or run from the command line), and also a Prefect global concurrency
limit of 1 when a Prefect server is configured (PREFECT_API_URL: every machine sharing the
server). Without a configured server each process starts its own temporary one, whose limits
nobody else sees, so the file lock is what serialises CLI runs. A holder that dies releases both:
the kernel drops a dead process's flock at once, and an unrenewed Prefect lease expires (LEASE_S).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tasks.runtime import cache_dir, run_logger

TRAINING_LOCK = "smolflow-training"  # one training at a time: nightly, on-demand and CLI runs alike
PROMOTION_LOCK = "smolflow-promotion"  # the gate's read of `promoted` and its move happen as one
LEASE_S = 300  # a crashed holder's Prefect slot frees itself after this long


def prefect_server() -> str | None:
    """The configured Prefect API URL, or None when runs use a temporary per-process server."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _ensure_limit(name: str) -> None:
    """Create the global concurrency limit (1 slot) if it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it just now
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


@contextlib.contextmanager
def file_lock(name: str, holder: str, directory: Path | None = None) -> Iterator[dict]:
    """Hold an exclusive flock on <directory, default SMOLFLOW_CACHE/locks>/<name>.lock; waits for
    the current holder."""
    path = (directory or cache_dir("locks")) / f"{name}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            run_logger().info("Waiting for %s, held by %s", name, f.read().strip() or "another process")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "holder": holder}))
        f.flush()
        try:
            yield {"kind": "file", "path": str(path)}
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(name: str, holder: str = "") -> Iterator[dict]:
    """Run the block while no other smolflow process holds `name`; yields how it was held."""
    log, start = run_logger(), time.monotonic()
    api = prefect_server()
    with contextlib.ExitStack() as stack:
        if api is not None:
            from prefect.concurrency.sync import concurrency

            _ensure_limit(name)
            stack.enter_context(concurrency(name, occupy=1, lease_duration=LEASE_S, strict=True))
        # Always the file lock as well: a CLI run without the server must not train beside a served one.
        how = stack.enter_context(file_lock(name, holder)) | ({"prefect_api": api} if api else {})
        how["waited_s"] = round(time.monotonic() - start, 3)
        log.info("%s acquired after %.1f s (%s)", name, how["waited_s"],
                 "Prefect global concurrency limit + file lock" if api else "file lock")
        yield how
