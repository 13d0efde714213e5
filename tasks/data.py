"""Data stage: load a chat dataset in smoltalk's `messages` schema and check every row.

Sources: a hub id (`load_dataset(id, subset)`), local .json/.jsonl/.parquet files or a directory
of them (split taken from each file's name: train.jsonl, test-00000.parquet, ...), or the
fixture shipped in tasks/fixtures/ (the offline default).
"""

from __future__ import annotations

import hashlib
import logging
import os
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
        return load_dataset(builder, data_files=files)
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
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to learn from"
    return None


def _check_batch(batch):
    return {"_problem": [row_problem(m) for m in batch["messages"]]}


def check_rows(ds, split: str) -> None:
    """Raise a BadRowsError naming the first bad rows (split, index, field, reason)."""
    if "messages" not in ds.column_names:
        raise BadRowsError(
            f"split {split!r} has no `messages` column (columns: {ds.column_names}); "
            "rows must be in smoltalk's schema: messages=[{role, content}, ...]"
        )
    problems = ds.map(_check_batch, batched=True, remove_columns=ds.column_names)["_problem"]
    bad = [(i, p) for i, p in enumerate(problems) if p]
    if bad:
        shown = "; ".join(f"row {i}: {p}" for i, p in bad[:5])
        raise BadRowsError(f"{len(bad)} bad row(s) in split {split!r}: {shown}. Fix or remove these rows.")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def load_chat_dataset(cfg: DataConfig) -> DatasetRef:
    """Load the train/test splits, check every row, and save them for the stages that follow."""
    # Not cached by Prefect: loading is the step that reads the data as it is now; the saved copy
    # is content-addressed by the datasets' own fingerprints, so unchanged data is saved once.
    from datasets import DatasetDict, load_from_disk

    raw = load_raw(cfg)
    splits = {}
    for key, split, limit in (("train", cfg.train_split, cfg.max_train_rows), ("test", cfg.test_split, cfg.max_test_rows)):
        if split not in raw:
            raise ValueError(
                f"data.{key}_split={split!r} is not in the dataset (splits: {sorted(raw)}); "
                f"set data.{key}_split to one of them"
            )
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        check_rows(ds, split)
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
        source=cfg.dataset, path=str(target), fingerprint=fingerprint, rows={k: len(v) for k, v in saved.items()}
    )
