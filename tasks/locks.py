"""Machine-wide (or server-wide) mutual exclusion for smolflow's critical sections.

`exclusive(name)` always holds an flock(2) file lock under SMOLFLOW_CACHE/locks (every process
on this machine with that cache, served or run from the command line), a machine-wide lock for
processes with other caches or users (`machine_lock`), and also a Prefect global concurrency
limit of 1 when a Prefect server is configured (PREFECT_API_URL: every machine sharing the
server). Without a configured server each process starts its own temporary one, whose limits
nobody else sees, so the file lock is what serialises CLI runs. A holder that dies releases both:
the kernel drops a dead process's flock at once, and an unrenewed Prefect lease expires (LEASE_S).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from uuid import UUID

from tasks.runtime import cache_dir, run_logger

TRAINING_LOCK = "smolflow-training"  # one training at a time: nightly, on-demand and CLI runs alike
PROMOTION_LOCK = "smolflow-promotion"  # the gate's read of `promoted` and its move happen as one
LEASE_S = 300  # a crashed holder's Prefect slot frees itself after this long
T = TypeVar("T")


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


def _uninterrupted(work: Callable[[], T]) -> T:
    """work() run to its end whatever comes to this thread meanwhile: a stop (SIGTERM, SIGINT, SIGHUP:
    its handler's exception) or an exception tasks/run_ending.py raises into it; what came is raised
    once work() is done, so a request the server carries out is not cut off before its answer is kept.
    Python raises both kinds in this thread only, so work() runs in a thread of its own while this
    one waits. Swapping the signal handlers for ones that note the signal would also defer it, but
    Prefect acknowledges a cancel only while its own SIGTERM handler is the one installed: a cancel
    that came then was not acknowledged, and the run ended Crashed instead of Cancelled."""
    done, context = {}, contextvars.copy_context()  # Prefect's settings and run context go along

    def run() -> None:
        try:
            done["value"] = context.run(work)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            done["error"] = err
        finally:
            done["finished"] = True

    worker, came = threading.Thread(target=run, name="smolflow-uninterrupted", daemon=True), None
    try:
        worker.start()
    except BaseException as err:  # noqa: BLE001 - raised into this thread: kept for after
        came = err
    # A plain sleep, not join() or an Event: an exception landing in one of those can leave the lock
    # under it taken or the thread marked as ended (Thread.join on Python 3.11: bpo-45274's handler).
    # If it landed in start() before the thread was made, the work never began: nothing to wait for.
    began_by = time.monotonic() + 5
    while True:  # the loop inside the try: what is raised into a thread lands on any instruction
        try:
            while "finished" not in done and (worker.ident is not None or time.monotonic() < began_by):
                time.sleep(0.01)
            break
        except BaseException as err:  # noqa: BLE001 - raised into this thread: kept for after
            came = came or err
    if came is not None:
        raise came
    if "error" in done:
        raise done["error"]
    return done["value"]


def ensure_limits() -> None:
    """The global concurrency limits of every lock here, on the configured server (smolflow serve)."""
    for name in (TRAINING_LOCK, PROMOTION_LOCK):
        _ensure_limit(name)


@contextlib.contextmanager
def _prefect_slot(name: str) -> Iterator[str]:
    """The one slot of the global concurrency limit `name`, on a lease Prefect renews while the block
    runs (as `prefect.concurrency.sync.concurrency(strict=True)` holds it), taken and given back
    through `_post` so that a busy server costs milliseconds, not seconds.

    A cancel in Prefect (SIGTERM) can come at any moment, also between the server granting the slot
    and this process reading the lease id; the slot would then stay taken until its lease expired
    (LEASE_S: the next run waited 5 minutes). So the answer is kept whatever comes meanwhile
    (`_uninterrupted`), and the slot is given back the same way."""
    from prefect.concurrency._leases import maintain_concurrency_lease

    taken: dict = {}
    try:
        _post("/v2/concurrency_limits/increment-with-lease", name,
              {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": LEASE_S}, keep=taken)
        if not taken.get("limits"):
            raise RuntimeError(f"no Prefect global concurrency limit named {name!r} on {prefect_server()}")
        with maintain_concurrency_lease(UUID(taken["lease_id"]), LEASE_S, raise_on_lease_renewal_failure=True):
            yield taken["lease_id"]
    finally:
        if taken.get("lease_id"):
            _give_back(name, taken["lease_id"])


def _give_back(name: str, lease_id: str) -> None:
    """The slot back to the server, also when a run's timeout or stop is raised into this thread
    while it is asked (tasks/run_ending.py raises them again until the run ends): what came is
    raised once the server has answered."""
    _uninterrupted(lambda: _post("/v2/concurrency_limits/decrement-with-lease", name, {"lease_id": lease_id},
                                 busy_for_s=30))


def _post(path: str, name: str, body: dict, busy_for_s: float = 120, keep: dict | None = None) -> dict:
    """POST `body` to the Prefect server's `path`, retried: 423 (the slot is taken) after the server's
    Retry-After, as long as it takes; 429/502/503 and dropped connections after 50 ms, doubling up
    to 1 s, for `busy_for_s`. `keep`: the answer is put there, each attempt run to its end whatever
    comes meanwhile (not the waits between them: a run waiting its turn for a slot stops at once).

    Why not Prefect's client retries: it waits 2 s before retrying a 503 (and sleeps after the last
    attempt too), and its SQLite server answers 503 when a write meets another one mid-transaction.
    On a run's last task (the promotion) that cost 1.8-1.9 s in 3 of 4 cached re-runs joined to a
    server here. So the request goes once through the Prefect client's HTTP session (its base URL
    and auth headers; Prefect's private `_client`, pinned in constraints.txt), and is retried here.
    """
    import httpx
    from prefect.client.orchestration import get_client

    def attempt(http) -> httpx.Response | httpx.TransportError:
        request = http.build_request("POST", path, json=body)
        if getattr(http, "enable_csrf_support", False):
            http._add_csrf_headers(request)
        try:
            response = httpx.Client.send(http, request)
        except httpx.TransportError as err:
            return err
        if response.is_success and keep is not None:
            keep.update(response.json() if response.content else {})
        return response

    pause, deadline, waiting = 0.05, time.monotonic() + busy_for_s, False
    with get_client(sync_client=True) as client:
        http = client._client
        while True:
            response = _uninterrupted(lambda: attempt(http)) if keep is not None else attempt(http)
            if isinstance(response, httpx.TransportError):
                response, dropped = None, response
            if response is not None and response.is_success:
                return response.json() if response.content else {}
            if response is None:
                if time.monotonic() >= deadline:
                    raise dropped
                wait, pause = pause, min(2 * pause, 1.0)
            elif response.status_code == 423:
                wait = float(response.headers.get("Retry-After", 1.0))
                if not waiting:
                    run_logger().info("Waiting for %s, held by another run (Prefect global concurrency limit)", name)
                    waiting = True
            elif response.status_code in (429, 502, 503) and time.monotonic() < deadline:
                wait, pause = pause, min(2 * pause, 1.0)
            else:
                response.raise_for_status()
                raise RuntimeError(f"unexpected answer {response.status_code} from the Prefect server to {path}")
            time.sleep(wait)


@contextlib.contextmanager
def file_lock(name: str, holder: str, directory: Path | None = None) -> Iterator[dict]:
    """Hold an exclusive flock on <directory, default SMOLFLOW_CACHE/locks>/<name>.lock; waits for
    the current holder."""
    path = (directory or cache_dir("locks")) / f"{name}.lock"
    with open(path, "a+", encoding="utf-8") as f:
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


MACHINE_ENV = "SMOLFLOW_MACHINE_LOCK"  # the machine-wide locks' namespace (default "smolflow")


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[dict]:
    """Hold `name` on this machine for every process, whatever its user or SMOLFLOW_CACHE: bound to
    the abstract unix socket `@<namespace>/<name>` (Linux), which the kernel frees when its holder
    exits, however it ends; waits for the holder. No file: nothing in /tmp another user could plant
    or remove. Elsewhere (macOS) none: the file lock alone, said in what it yields."""
    import socket
    import sys

    if not sys.platform.startswith("linux"):
        yield {}
        return
    address = f"\0{os.environ.get(MACHINE_ENV) or 'smolflow'}/{name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        waiting = False
        while True:
            try:
                sock.bind(address)
                break
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
                if not waiting:
                    run_logger().info("Waiting for %s, held by another smolflow process on this machine "
                                      "(another user's or cache's)", name)
                    waiting = True
                time.sleep(0.5)
        yield {"machine": address[1:]}


@contextlib.contextmanager
def exclusive(name: str, holder: str = "", directory: Path | None = None) -> Iterator[dict]:
    """Run the block while no other smolflow process holds `name`; yields how it was held. The file
    lock lives in `directory` (default SMOLFLOW_CACHE/locks)."""
    log, start = run_logger(), time.monotonic()
    api = prefect_server()
    with contextlib.ExitStack() as stack:
        if api is not None:
            _ensure_limit(name)
            stack.enter_context(_prefect_slot(name))
        # Always the file lock as well: a CLI run without the server must not train beside a served one.
        how = stack.enter_context(file_lock(name, holder, directory)) | ({"prefect_api": api} if api else {})
        if directory is None:  # a lock in the cache: also for processes with another cache on this machine
            how |= stack.enter_context(machine_lock(name))
        how["waited_s"] = round(time.monotonic() - start, 3)
        log.info("%s acquired after %.1f s (%s)", name, how["waited_s"],
                 " + ".join(["Prefect global concurrency limit"] * bool(api) + ["file lock"]
                            + ["machine lock"] * ("machine" in how)))
        yield how
