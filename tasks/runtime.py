"""Process-wide settings every stage shares: where caches live, online or not, thread counts."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


# Defaults every smolflow process sets for itself and its children (the `smolflow` command, and
# `python -m deployments.local`, which `make serve` documents): no telemetry calls from a machine
# that may be offline, and time for a temporary Prefect server's first start (its database set-up
# can take over the 20 s default on a busy 2-core machine).
ENV_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                # Months of nightlies: the server also deletes finished flow runs (with their logs and
                # artifacts) after its retention period (90 days), not only old events. The run
                # folders under output.artifacts_uri are the lasting record.
                "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs"}


def env_defaults() -> None:
    """ENV_DEFAULTS, where the user has not set them; before anything imports Prefect."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


FIXTURES = Path(__file__).parent / "fixtures"


def shadowing(folder: Path | None = None) -> Path | None:
    """The file in `folder` (default: this one) that Python would import instead of smolflow's own
    `flows` or `tasks` package in a process whose import path starts there (`python -m`, Prefect's
    flow-run process, Ray's workers), or None. A Prefect project often has both."""
    folder = (folder or Path.cwd()).resolve()
    if folder == Path(__file__).resolve().parents[1]:  # smolflow's own checkout
        return None
    for name in ("flows", "tasks"):
        for found in (folder / name / "__init__.py", folder / f"{name}.py"):
            if found.exists():
                return found
    return None


def cache_root() -> Path:
    """smolflow's local cache: SMOLFLOW_CACHE, else $XDG_CACHE_HOME/smolflow, else ~/.cache/smolflow.
    `~` expanded: systemd units, .env files and `docker -e` pass it literally."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "smolflow")
    return Path(os.path.expanduser(os.environ.get("SMOLFLOW_CACHE") or default)).absolute()


class CacheUnusable(ValueError):
    """The local cache cannot be made or written: a setting to change (SMOLFLOW_CACHE, HOME), not a
    failure to retry; the CLI says it in one line."""


def cache_dir(*parts: str) -> Path:
    """A directory under smolflow's local cache (`cache_root`), made if missing."""
    path = cache_root().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # HOME=/ or unwritable (a service account, a container's user), a read-only disk
        raise CacheUnusable(f"smolflow's cache {cache_root()} cannot be used ({err.strerror}: {err.filename}). "
                            "Set SMOLFLOW_CACHE (or XDG_CACHE_HOME) to a folder this user can write") from None
    return path


RUN_TIMEOUT_ENV = "SMOLFLOW_RUN_TIMEOUT_HOURS"


MAX_TIMEOUT_HOURS = 24 * 365


def run_timeout() -> float | None:
    """SMOLFLOW_RUN_TIMEOUT_HOURS in seconds (unset, empty, 0 or 'none': no limit), read when a flow
    is imported: a flow run that takes longer ends TimedOut, so a hung nightly frees its
    deployment's one slot for the next night and the failed-run alert fires (`smolflow serve`
    sets 23 unless told otherwise)."""
    value = os.environ.get(RUN_TIMEOUT_ENV, "").strip().lower()
    if value in ("", "0", "none"):
        return None
    try:
        hours = float(value)
    except ValueError:
        raise ValueError(f"{RUN_TIMEOUT_ENV}={value!r} is not a number of hours; set e.g. 23, or 0 for no limit") from None
    # inf, nan or 1e300 passed here, then failed every run in Prefect's timer (time_t overflow)
    if not 0 <= hours <= MAX_TIMEOUT_HOURS:
        raise ValueError(f"{RUN_TIMEOUT_ENV}={value!r}: set hours from 0 to {MAX_TIMEOUT_HOURS} (a year; 0: no limit)")
    return hours * 3600 or None


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def split_of(path: Path | str) -> str:
    """The split a data file holds, from its name, as the hub names shards: "train.jsonl",
    "train-00000-of-00002.parquet" and "train_0.json" all belong to "train"."""
    return Path(path).name.split(".")[0].split("-")[0].split("_")[0]


def cores() -> int:
    """The cores this process may use (its CPU affinity, as a job scheduler or `taskset` sets it)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def default_threads() -> int:
    """torch's threads when `torch_threads` is null (threads_default's count)."""
    return threads_default()[0]


def threads_default() -> tuple[int, str]:
    """(count, where it comes from) for `torch_threads: null`: OMP_NUM_THREADS where it is set, the
    count torch, MKL and job schedulers (Slurm, Kubernetes' CPU managers) go by; else every core this
    process may use: a run owns its machine, and on this project's 2-core machine two threads trained
    1.7x faster than one (docs/training.md). Where other heavy processes share the cores, set either
    lower: oversubscribed cores made a forward pass ~10x slower. The tests set OMP_NUM_THREADS=1 so."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    if omp:
        run_logger().warning("OMP_NUM_THREADS=%r is not a positive whole number: not used; torch runs on every "
                             "core (%d). Set it to a count, or unset it", omp, cores())
    return cores(), "every core"


_threads: list[int] = []  # the count set_torch_threads last asked for


def set_torch_threads(n: int | None) -> int:
    """torch's thread count: now if torch is imported, else as it is (its import takes ~1.5 s, and a
    cached re-run may never load a model)."""
    import sys

    from tasks.console import after_import

    what = "torch_threads" if n else "OMP_NUM_THREADS"  # torch_threads: null takes OMP_NUM_THREADS where set
    n = n or default_threads()
    if n > cores():  # a config written for a bigger machine: said, not silently slow
        run_logger().warning("%s=%d is more than the %d core(s) this process may use: oversubscribed cores make torch "
                             "far slower (~10x seen); set %s to at most %d, or %s for every core", what, n, cores(),
                             what, cores(), "null" if what == "torch_threads" else "unset it")
    _threads[:] = [n]
    after_import("torch", lambda: sys.modules["torch"].set_num_threads(n), key="threads")
    return n


def torch_threads() -> int:
    """The threads torch runs with (set_torch_threads' count, without importing torch for it)."""
    import sys

    if "torch" in sys.modules or not _threads:
        import torch

        return torch.get_num_threads()
    return _threads[0]


def sha256_stream(f: BinaryIO, digest=None):
    """Feed an open binary file into a sha256 (a new one unless given), 1 MiB at a time."""
    digest = digest or hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest


def sha256_file(path: Path | str) -> str:
    """The sha256 of one file's bytes."""
    with open(path, "rb") as f:
        return sha256_stream(f).hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One digest over several files' names and bytes (order-independent)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            sha256_stream(f, digest)
    return digest.hexdigest()


REMEMBER_BYTES = 16 << 20  # smaller files hash faster than their remembered digest is looked up


def remembered_digest(kind: str, paths: list[Path], compute: Callable[[], str]) -> str:
    """compute()'s digest of local files, kept in SMOLFLOW_CACHE/digests under the files' identity
    (name, device, inode, size, mtime), the way git's index and ccache skip unchanged files: every
    run hashed the same 517 MB model two or three times (fingerprint, manifest), and a hard-linked
    copy is the same inode. A file rewritten in place gets a new mtime, so a new digest; one
    modified in the last seconds is never remembered (file-system clocks are coarse: a second
    write in the same tick would keep the mtime; git calls this "racy")."""
    import time

    stats = []
    for path in sorted(paths, key=lambda p: Path(p).name):
        st = os.stat(path)
        stats.append([Path(path).name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns])
    racy = any(time.time_ns() - s[4] < 2e9 for s in stats)
    if racy or sum(s[3] for s in stats) < REMEMBER_BYTES:
        return compute()
    import json

    kept = cache_dir("digests") / hashlib.sha256(json.dumps([kind, stats]).encode()).hexdigest()[:32]
    try:
        return kept.read_text(encoding="utf-8")
    except FileNotFoundError:
        value = compute()
        atomic_write(kept, value)
        return value


def atomic_write(path: Path | str, data: bytes | str) -> Path:
    """Write a file whole or not at all: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        staging.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(staging, path)  # atomic on one file system
    except BaseException as err:  # a full disk (ENOSPC) or an interrupt: no partial staging file left behind
        staging.unlink(missing_ok=True)
        # A write's ENOSPC names no file ("[Errno 28] No space left on device"): say where, and the room.
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(err, path.parent) from err
        raise
    return path


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory in a staging folder and rename it into place when the block succeeds, so
    a half-written cache entry (a crash, a full disk) is never picked up; the staging folder of a
    failed attempt is removed. If another process finished the same entry first, theirs stays."""
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed attempt with this pid
    try:
        yield staging
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed: plots are drawn in long-lived workers).

    The image is cropped to what is drawn, labels included: a long label (an arena model's name)
    would otherwise run off the figure's edge, which tight_layout only warns about."""
    import io
    import warnings

    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)  # bbox_inches makes the room
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return buf.getvalue()


def redact_url(url: str) -> str:
    """The URL without user:password@ and without a query that holds a key or token: what may reach
    cache keys, results, messages and logs."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    from tasks.config_base import QUERY_SECRETS

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        return "(a URL that does not parse)"
    if parts.username is not None or parts.password is not None:
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""  # IPv6
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    if any(QUERY_SECRETS.search(name) for name, _ in parse_qsl(parts.query, keep_blank_values=True)):
        parts = parts._replace(query="(redacted)")
    return urlunsplit(parts).rstrip("/")


def secret(block: str, field: str, instead: str) -> str:
    """The value of the Prefect Secret block `block`; a ValueError naming the setting `field` (and
    what to do `instead`) when no such block exists. Secrets never pass through the config."""
    from prefect.blocks.system import Secret

    try:
        return Secret.load(block).get()
    except ValueError as err:
        raise ValueError(f"{field}={block!r}: no such Prefect Secret block; create it (Secret(value=...)"
                         f".save({block!r}) or the UI's Blocks page) or unset it to use {instead}") from err


def flow_run_link() -> str | None:
    """The Prefect UI's page of the current flow run (None outside a flow or without a UI)."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    # Prefect builds it as f"{PREFECT_UI_URL}/flow-runs/..." even where that is None: a run on its
    # own temporary server (no UI, gone after the run) linked to "None/flow-runs/flow-run/<id>".
    if not PREFECT_UI_URL.value():
        return None
    try:
        link = flow_run.ui_url
    except Exception:  # no API configured: nothing to link to
        return None
    # Prefect derives the UI's address from PREFECT_API_URL, user:password@ included (a server behind
    # basic auth); the link goes into the report, the Prefect artifacts and W&B's config and notes.
    return link and redact_url(link)


def code_version() -> str:
    """smolflow's version, plus the git commit (and '+dirty') when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"smolflow {version('smolflow')}"
    except PackageNotFoundError:
        text = "smolflow (not installed)"
    commit = git_commit()
    return f"{text}, git {commit}" if commit else text


def git_commit() -> str | None:
    """smolflow's git commit ('+dirty' with uncommitted changes) when it runs from a checkout, else None."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        return None  # installed into site-packages: a git repository around it is someone else's
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        if Path(top).resolve() != root:
            return None  # a copy inside another project's repository: its commit is not smolflow's
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return None


def run_logger():
    """Prefect's run logger inside a flow or task (shown in the UI), a plain logger outside."""
    import logging
    import sys

    if "prefect" not in sys.modules:  # no flow or task runs in this process (`smolflow gc`): not worth its import
        return logging.getLogger("smolflow")
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("smolflow")


# ---- retries: transient failures only --------------------------------------------------------

# A missing file, bad value or refused permission fails the same way on every attempt: retrying
# only delays the message (a missing dataset took ~60 s to fail with retries=2 and 5 s + 30 s).
_DETERMINISTIC = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError,
                  ValueError, TypeError, KeyError, LookupError, NotImplementedError, ImportError)


def _status_code(err: BaseException) -> int | None:
    """The HTTP status an exception carries (requests/httpx/openai/urllib/botocore), if any."""
    response = getattr(err, "response", None)
    for holder, attr in ((err, "status_code"), (response, "status_code"), (response, "status"), (err, "code")):
        value = getattr(holder, attr, None) if holder is not None else None
        if isinstance(value, int) and 100 <= value < 600:
            return value
    if isinstance(response, dict):  # botocore ClientError
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return value if isinstance(value, int) else None
    return None


def is_transient(err: BaseException | None) -> bool:
    """Worth another attempt: a connection error, timeout, HTTP 5xx or storage I/O error, anywhere
    in the exception's cause chain. Deterministic errors (a missing file, bad config or value,
    offline mode) are not, even when caused by a connection error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        if "OfflineModeIsEnabled" in name or "OfflineModeIsEnabled" in str(err):
            return False  # HF_HUB_OFFLINE: the hub is off on purpose, every attempt fails alike
        if name in ("StorageError", "IntegrityError", "ValidationError") or isinstance(err, _DETERMINISTIC):
            return False
        status = _status_code(err)
        if status is not None:
            return status >= 500 or status == 429
        if isinstance(err, (ConnectionError, TimeoutError)) or name in (
            "ConnectTimeout", "ReadTimeout", "ConnectError", "APIConnectionError", "APITimeoutError",
            "EndpointConnectionError", "ConnectionClosedError", "HTTPClientError", "ReadTimeoutError",
        ):
            return True
        if type(err) is OSError and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return False  # a full or read-only disk fails the same way again
        if type(err) is OSError or name in ("ChunkedEncodingError",):  # a bare I/O error of the store
            return True
        err = err.__cause__ or err.__context__
    return False


# What writers that are not Python's own say for ENOSPC/EDQUOT: safetensors (Rust) "os error 28";
# torch's checkpoint writer only "[enforce fail at inline_container.cc:...] . unexpected pos N vs M"
# (and "file write failed"), which names neither the cause nor the folder.
_FULL_SAID = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
LOW_ROOM = 64 * 2**20  # bytes: below this a failed write is taken for a full disk
# What a writer says when it fails without saying why: torch's "[enforce fail at inline_container.cc:672]
# . unexpected pos ..." (its zip writer), "PytorchStreamWriter failed writing file ...", safetensors' I/O.
_WRITE_SAID = ("inline_container", "unexpected pos", "streamwriter", "failed writing", "write", "i/o error")


def disk_full(err: BaseException, folder: Path | str) -> OSError | None:
    """The error a failed write into `folder` should have raised when the disk is full: OSError(ENOSPC)
    naming the folder, the room left and what the writer said; None when it is something else. A full
    disk is named when the error says so (anywhere in its chain), or when a writer failed (an OSError,
    or words of one) and the file system has under LOW_ROOM free, as after torch's writer ran out: its
    message never says so."""
    chain, seen = [], err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    said = any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
               or any(words in str(e).lower() for words in _FULL_SAID) for e in chain)
    # Low room explains a writer's failure, not any error: a bad shape on a nearly full disk is a bad shape.
    wrote = any(isinstance(e, OSError) or any(words in str(e).lower() for words in _WRITE_SAID) for e in chain)
    try:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if not said and (free is None or free >= LOW_ROOM or not wrote):
        return None
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    room = f"{free / 1e6:.1f} MB free there" if free is not None else "room unknown"
    return OSError(errno.ENOSPC, f"No space left on device ({room}; {type(err).__name__}: {message}). Free space "
                                 f"on that file system, or lower output.keep_runs / output.cache_max_gb", str(folder))


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task run only when its error is transient."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # noqa: BLE001 - a result that cannot be read: judge what was raised
            exc = err
    transient = isinstance(exc, BaseException) and is_transient(exc)
    if not transient:
        run_logger().info("Not retrying %s: %s is not a transient failure", task.name, type(exc).__name__)
    return transient
