"""Data stage: load a chat dataset in smoltalk's `messages` schema and check every row.

Sources: a hub id (`load_dataset(id, subset)`), local .json/.jsonl/.parquet files or a directory
of them (split taken from each file's name: train.jsonl, test-00000.parquet, ...), or the
fixture shipped in tasks/fixtures/ (the offline default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.config import DataConfig
from tasks.runtime import FIXTURES, cache_dir, hub_offline

log = logging.getLogger(__name__)

HUB_DEFAULT = ("HuggingFaceTB/smoltalk", "everyday-conversations")
FIXTURE_PREFIX = "fixture:"
ROLES = {"system", "user", "assistant", "tool"}
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DatasetRef(BaseModel):
    """A prepared dataset on local disk (datasets' Arrow format) and what it is."""

    source: str
    path: str
    fingerprint: str
    rows: dict[str, int]
    dropped: dict[str, dict[str, int]] = {}  # split -> {reason: rows dropped} (data.bad_rows='drop')


class BadRowsError(ValueError):
    pass


def local_data_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    """(builder, {split: [files]}) for a local file or directory of json/jsonl/parquet files."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _FORMATS)
    if not files:
        raise ValueError(f"data.dataset={str(path)!r}: no .json, .jsonl or .parquet files there")
    builders = {_FORMATS.get(f.suffix) for f in files}
    if None in builders or len(builders) > 1:
        raise ValueError(f"data.dataset={str(path)!r}: use one format, .json/.jsonl or .parquet")
    if path.is_file():
        return builders.pop(), {"train": [str(path)]}
    splits: dict[str, list[str]] = {}
    for f in files:
        # "train.jsonl", "train-00000-of-00002.parquet" and "train_0.json" all belong to "train".
        splits.setdefault(f.stem.split("-")[0].split("_")[0], []).append(str(f))
    return builders.pop(), splits


def load_raw(cfg: DataConfig):
    """The DatasetDict the config names, before any checks."""
    from datasets import load_dataset

    source = cfg.dataset
    if source == "auto":
        source = FIXTURE_PREFIX + "everyday-conversations" if hub_offline() else HUB_DEFAULT[0]
    if source.startswith(FIXTURE_PREFIX):
        name = source.removeprefix(FIXTURE_PREFIX).replace("-", "_")
        if not (FIXTURES / name).is_dir():
            raise ValueError(f"data.dataset={cfg.dataset!r}: no shipped fixture {name!r}")
        builder, files = local_data_files(FIXTURES / name)
        return load_dataset(builder, data_files=files)
    local = Path(source).expanduser()
    if local.exists():
        builder, files = local_data_files(local)
        try:
            return load_dataset(builder, data_files=files)
        except Exception as err:  # datasets wraps Arrow's cast errors in several types
            raise BadRowsError(
                f"data.dataset={cfg.dataset!r}: could not read {files} as one table ({str(err).splitlines()[0]}). "
                "Usually a field has different types in different rows, e.g. `messages` a string in some "
                "and a list of {role, content} in others: make every row's `messages` such a list."
            ) from err
    if source.startswith((".", "/", "~")):
        raise ValueError(f"data.dataset={cfg.dataset!r}: no such file or directory")
    try:
        return load_dataset(source, cfg.subset)
    except ConnectionError as err:
        raise RuntimeError(
            f"data.dataset={source!r} (subset {cfg.subset!r}) is not cached locally and the hub is "
            "unreachable or disabled (HF_HUB_OFFLINE). Point data.dataset at local files instead: a "
            ".jsonl/.parquet file or a directory with train.jsonl and test.jsonl in the `messages` "
            "schema, or use 'fixture:everyday-conversations'."
        ) from err


def row_problem(messages) -> str | None:
    """Why a row can't be trained on, or None. Messages follow smoltalk's schema."""
    if messages is None:
        return "missing `messages`"
    if not isinstance(messages, list):
        return f"`messages` is a {type(messages).__name__}, not a list"
    if not messages:
        return "`messages` is empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is not a dict"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role is {m.get('role')!r}, expected one of {sorted(ROLES)}"
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"messages[{i}].content is empty or not a string"
    if any(m["role"] == "system" for m in messages[1:]):
        return "a system message that is not first (templates only accept it as messages[0])"
    for i in range(1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"] in ("user", "assistant"):
            return f"messages[{i - 1}] and messages[{i}] are both {messages[i]['role']!r} turns (roles must alternate)"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to learn from"
    return None


def reason_kind(problem: str) -> str:
    """A problem without its row's particulars (indices, values), for counting by reason."""
    if problem.startswith("duplicate"):
        return "duplicate row"
    kind = re.sub(r"\[\d+\]", "[i]", problem)
    kind = re.sub(r"\.role is .*", ".role is not a known role", kind)
    return kind.split(" (")[0]


def _check_batch(batch):
    problems = [row_problem(m) for m in batch["messages"]]
    # A digest per row finds duplicates later without holding every conversation in memory.
    digests = [hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest() for m in batch["messages"]]
    return {"_problem": problems, "_digest": digests}


def check_rows(ds, split: str, policy: str = "strict"):
    """Check every row (batched, on Arrow). strict: raise a BadRowsError naming the first bad rows
    (split, index, field, reason). drop: return the good rows and {reason kind: count}."""
    if "messages" not in ds.column_names:
        raise BadRowsError(
            f"split {split!r} has no `messages` column (columns: {ds.column_names}); "
            "rows must be in smoltalk's schema: messages=[{role, content}, ...]"
        )
    # Never from datasets' map cache: it keys module-level functions by name, not code, so a
    # cached result could predate a change to the checks. The result (a reason and a digest
    # per row) is small enough to keep in memory.
    checked = ds.map(_check_batch, batched=True, remove_columns=ds.column_names,
                     load_from_cache_file=False, keep_in_memory=True)
    problems, seen = list(checked["_problem"]), {}
    for i, digest in enumerate(checked["_digest"]):
        if problems[i] is None and digest in seen:
            problems[i] = f"duplicate of row {seen[digest]}"
        seen.setdefault(digest, i)
    bad = [(i, p) for i, p in enumerate(problems) if p]
    if bad and policy == "strict":
        shown = "; ".join(f"row {i}: {p}" for i, p in bad[:5])
        raise BadRowsError(
            f"{len(bad)} bad row(s) in split {split!r}: {shown}. Fix or remove these rows, "
            "or set data.bad_rows='drop' to train without them."
        )
    counts: dict[str, int] = {}
    for _, problem in bad:
        counts[reason_kind(problem)] = counts.get(reason_kind(problem), 0) + 1
    keep = [i for i, p in enumerate(problems) if p is None]
    return (ds.select(keep) if bad else ds), counts


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def load_chat_dataset(cfg: DataConfig) -> DatasetRef:
    """Load the train/test splits, check every row, and save them for the stages that follow."""
    # Not cached by Prefect: loading is the step that reads the data as it is now; the saved copy
    # is content-addressed by the datasets' own fingerprints, so unchanged data is saved once.
    from datasets import DatasetDict, load_from_disk

    raw = load_raw(cfg)
    splits, dropped = {}, {}
    for key, split, limit in (("train", cfg.train_split, cfg.max_train_rows), ("test", cfg.test_split, cfg.max_test_rows)):
        if split not in raw:
            raise ValueError(
                f"data.{key}_split={split!r} is not in the dataset (splits: {sorted(raw)}); "
                f"set data.{key}_split to one of them"
            )
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        ds, dropped[key] = check_rows(ds, split, cfg.bad_rows)
        if dropped[key]:
            log.warning("Dropped %d bad row(s) from split %r: %s", sum(dropped[key].values()), split, dropped[key])
        splits[key] = ds.select_columns(["messages"])
    fingerprint = hashlib.sha256("".join(ds._fingerprint for ds in splits.values()).encode()).hexdigest()
    target = cache_dir("datasets") / fingerprint[:16]
    if not (target / "dataset_dict.json").exists():
        staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
        DatasetDict(splits).save_to_disk(str(staging))
        staging.rename(target)  # atomic: a half-saved copy is never picked up
    saved = load_from_disk(str(target))
    log.info("Dataset %s: %s", cfg.dataset, {k: len(v) for k, v in saved.items()})
    return DatasetRef(
        source=cfg.dataset, path=str(target), fingerprint=fingerprint, rows={k: len(v) for k, v in saved.items()},
        dropped=dropped,
    )
