"""Data stage: load a chat dataset in smoltalk's `messages` schema and check every row.

Sources: a hub id (`load_dataset(id, subset)`), local .json/.jsonl/.parquet files or a directory
of them (split taken from each file's name: train.jsonl, test-00000.parquet, ...), or the
fixture shipped in tasks/fixtures/ (the offline default).

Rows may also carry the seed's richer shapes: assistant `tool_calls`
([{type: function, function: {name, arguments}}], or the seed's {tool, parameters}, which is
rewritten into that), `role: tool` replies, and content as a list of parts ([{type: text, text},
{type: image, ...}]). They are checked like plain turns and counted in `DatasetRef.shapes`, so the
template stage can insist on a template that renders them. The checks themselves are in
tasks/rows.py.

Bad rows are named where they are: `train.jsonl:7` (the line, 1-based), `train.json row 3`,
`train-00000.parquet row 3`, or `split 'train' row 3` for hub data. A JSON file that Arrow cannot
read as one table is read line by line instead, so a broken line is one bad row, not a lost file.

Scale: every pass is a batched `datasets.map` over memory-mapped Arrow (several processes for big
splits); what stays in memory is one short digest and flag per row, never the conversations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from importlib.metadata import version
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.code_version import code_digest
from tasks.config import DataConfig
from tasks.datafiles import FORMATS, READ_PROBLEM, Origin, UnreadableError, local_data_files, read_split, unread_files
from tasks.rows import (  # noqa: F401 - as_written, row_problem, row_shapes: used from here by other stages
    CHATML_TOKENS, SHAPES, as_written, may_hold_token, normalize, pairs_to_messages, reason_kind, row_json, row_problem,
    row_shapes, sharegpt_problem, sharegpt_to_messages, special_token_problem, token_pattern,
)
from tasks.runtime import FIXTURES, atomic_dir, atomic_write, cache_dir, cores, hub_offline, retry_transient

log = logging.getLogger(__name__)

HUB_DEFAULT = ("HuggingFaceTB/smoltalk", "everyday-conversations")
FIXTURE_PREFIX = "fixture:"
# Below this many rows, starting worker processes costs more than it saves.
PARALLEL_FROM_ROWS = 20_000


class DatasetRef(BaseModel):
    """A prepared dataset on local disk (datasets' Arrow format) and what it is."""

    source: str  # what data.dataset named (`auto`: what it meant here), with a hub subset
    path: str
    fingerprint: str
    rows: dict[str, int]
    dropped: dict[str, dict[str, int]] = {}  # split -> {reason: rows dropped} (data.bad_rows='drop')
    # Rows (both splits) with assistant tool_calls, with role-tool replies, with content given as a
    # list of parts: the template must render these (tasks/templates.py checks it).
    shapes: dict[str, int] = {}
    # data.special_tokens_in_text as applied, and the special tokens the text was checked for.
    special_tokens_in_text: str = "reject"
    special_tokens: list[str] = []
    # split -> {what: rows}: 'special tokens escaped', 'seed tool-call shorthand' (rewritten, kept).
    rewritten: dict[str, dict[str, int]] = {}
    held_out: str | None = None  # how data.test_size made the test split, when it did
    # The train split's rows as read: 'messages', 'prompt/completion' (TRL's pairs) or 'sharegpt'
    # (`conversations`); template.assistant_only_loss 'auto' decides by it.
    layout: str = "messages"
    # Test rows whose whole conversation is also a train row's (as checked, after normalising): its
    # eval loss partly measures what was memorised.
    test_in_train: int = 0
    # The test rows' content as checked, in order (a digest of their digests): equal for the same rows
    # wherever the files are, which `fingerprint` (datasets' own: paths and times) is not.
    test_digest: str | None = None

    def markdown(self) -> str:
        """Source, rows per split, fingerprint, rows dropped and rewritten by reason, special tokens, for the report."""
        rows = " · ".join(f"{split}: {n} rows" for split, n in self.rows.items())
        dropped = "".join(
            f"\nDropped from {split}: " + ", ".join(f"{n} × {reason}" for reason, n in counts.items()) + "\n"
            for split, counts in self.dropped.items() if counts
        )
        rewritten = "".join(
            f"\nRewritten in {split} (kept): " + ", ".join(f"{n} × {what}" for what, n in counts.items()) + "\n"
            for split, counts in self.rewritten.items() if counts
        )
        tokens = f"\nSpecial tokens typed in text ({len(self.special_tokens)} checked): {self.special_tokens_in_text}\n"
        held = f" ({self.held_out})" if self.held_out else ""
        read = f" · read from {self.layout} rows" if self.layout != "messages" else ""
        seen = (f"\n**{self.test_in_train} of the {self.rows.get('test', 0)} test rows are also train rows**: the eval "
                "loss partly measures what was memorised\n") if self.test_in_train else ""
        return (f"Source `{self.source}`{read} · {rows}{held} · fingerprint `{self.fingerprint}`\n"
                f"{seen}{dropped}{rewritten}{tokens}")


class BadRowsError(ValueError):
    pass


FIX_ROWS = "Fix or remove these rows, or set data.bad_rows='drop' to train without them."


def num_proc_for(rows: int, num_proc: int | None = None) -> int | None:
    """`num_proc` for a map over `rows` rows: None (this process) for small data, every core for
    big data. Never 1: datasets would still start one worker process for it."""
    if num_proc is None:
        num_proc = 1 if rows < PARALLEL_FROM_ROWS else min(cores(), 8)
    return num_proc if num_proc > 1 else None


def _source(cfg: DataConfig) -> tuple[str, Path | None]:
    """(the concrete source, the local file or folder it names: a fixture, a path; None for hub data)."""
    source = cfg.dataset
    if source == "auto":
        source = FIXTURE_PREFIX + "everyday-conversations" if hub_offline() else HUB_DEFAULT[0]
    if source.startswith(FIXTURE_PREFIX):
        name = source.removeprefix(FIXTURE_PREFIX).replace("-", "_")
        if not (FIXTURES / name).is_dir():
            raise ValueError(f"data.dataset={cfg.dataset!r}: no shipped fixture {name!r}")
        return source, FIXTURES / name
    local = Path(source).expanduser()
    if local.exists():
        return source, local
    if names_a_path(source):
        raise ValueError(f"data.dataset={cfg.dataset!r}: no such file or directory (from {Path.cwd()})")
    return source, None


def names_a_path(source: str) -> bool:
    """Whether data.dataset, found nowhere, was meant as a path: it starts like one, has a data
    file's suffix, or more than one slash (a hub id is `name` or `owner/name`). `d/x.jsonl` was
    once looked up on the hub, and the message said so."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix.lower() in FORMATS


def hub_subset(cfg: DataConfig, source: str) -> str | None:
    """The hub config to load: data.subset, where 'auto' is smoltalk's everyday-conversations for
    smoltalk and none for any other dataset (most have no configs, or a default one)."""
    if cfg.subset != "auto":
        return cfg.subset
    return HUB_DEFAULT[1] if source == HUB_DEFAULT[0] else None


def load_raw(cfg: DataConfig) -> tuple:
    """(the DatasetDict the config names, before any checks; {split: Origin} to name its rows)."""
    from datasets import DatasetDict, load_dataset

    source, local = _source(cfg)
    if local is not None and cfg.subset not in (None, "auto"):
        raise ValueError(f"data.subset={cfg.subset!r}: only hub datasets have subsets, and {source!r} is local "
                         "files; remove data.subset (or set it to null)")
    if local is not None:
        builder, files = local_data_files(local)
        # Split by split: datasets otherwise fixes the schema from the first split it reads and
        # casts the others to it (failing, or turning their lists of parts into strings).
        try:
            raw = DatasetDict({split: read_split(cfg.dataset, builder, files[split], split) for split in files})
        except UnreadableError as err:
            raise BadRowsError(str(err)) from err
        return raw, {split: Origin(split, builder, files[split]) for split in files}
    subset = hub_subset(cfg, source)
    try:
        raw = load_dataset(source, subset)
    except ConnectionError as err:
        raise RuntimeError(
            f"data.dataset={source!r} (subset {subset!r}) is not cached locally and the hub is "
            "unreachable or disabled (HF_HUB_OFFLINE). Point data.dataset at local files instead: a "
            ".jsonl/.parquet file or a directory with train.jsonl and test.jsonl in the `messages` "
            "schema, or use 'fixture:everyday-conversations'."
        ) from err
    return raw, {split: Origin(split) for split in raw}


def _check_batch(batch, tokens: list[str], escape: bool):
    pattern = token_pattern(tokens)
    out = {"_problem": [], "_digest": [], "_rewritten": [], **{f"_{s}": [] for s in SHAPES}}
    unread = batch.get(READ_PROBLEM) or [None] * len(batch["messages"])
    for messages, unreadable in zip(batch["messages"], unread):
        messages, changes = normalize(messages, pattern, escape)
        text = row_json(messages)
        problem = unreadable or row_problem(messages) or (
            special_token_problem(messages, pattern) if may_hold_token(text, pattern) else None)
        out["_problem"].append(problem)
        out["_rewritten"].append(",".join(changes) or None)
        # 16 bytes of a digest per row find duplicates later without holding conversations in memory.
        out["_digest"].append(hashlib.sha256(text.encode()).digest()[:16])
        for shape, flag in zip(SHAPES, row_shapes(messages) if problem is None else (False,) * 3):
            out[f"_{shape}"].append(flag)
    return out


def _normalize_batch(batch, tokens: list[str], escape: bool):
    pattern = token_pattern(tokens)
    return {"messages": [normalize(m, pattern, escape)[0] for m in batch["messages"]]}


def _pairs_to_messages(batch):
    return {"messages": [pairs_to_messages(p, c) for p, c in zip(batch["prompt"], batch["completion"])]}


def _sharegpt_to_messages(batch):
    systems = batch["system"] if "system" in batch else [None] * len(batch["conversations"])
    return {"messages": [sharegpt_to_messages(c, s) for c, s in zip(batch["conversations"], systems)],
            # named as written; "" for none: a first batch of None only would type the column null
            READ_PROBLEM: [sharegpt_problem(c) or "" for c in batch["conversations"]]}


def layout_of(ds) -> str:
    """How the rows are laid out, as as_messages reads them: 'messages', 'sharegpt' or 'prompt/completion'."""
    if "messages" not in ds.column_names and "conversations" in ds.column_names:
        return "sharegpt"
    if "messages" not in ds.column_names and {"prompt", "completion"} <= set(ds.column_names):
        return "prompt/completion"
    return "messages"


def as_messages(ds, split: str):
    """Rows in `messages` form: prompt/completion pairs (TRL's schema, text or conversational) become a
    user turn and an assistant turn, ShareGPT's `conversations` ({from, value} turns, plus its
    `system` prompt) messages; then they face the same checks as any conversation."""
    layout = layout_of(ds)
    if layout == "sharegpt":
        log.info("Split %r has ShareGPT `conversations`: reading each {from, value} turn as a message", split)
        return ds.map(_sharegpt_to_messages, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                      desc=f"conversations -> messages ({split})")
    if layout == "messages":
        return ds
    log.info("Split %r has prompt/completion columns: turning each pair into a user and an assistant turn", split)
    return ds.map(_pairs_to_messages, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                  desc=f"prompt/completion -> messages ({split})")


def _check_features():
    from datasets import Features, Value

    # Typed up front: a first batch of good rows would otherwise fix `_problem` as null.
    return Features({"_problem": Value("string"), "_digest": Value("binary"), "_rewritten": Value("string"),
                     **{f"_{s}": Value("bool") for s in SHAPES}})


def check_rows(ds, split: str, policy: str = "strict", num_proc: int | None = None, tokens=CHATML_TOKENS,
               escape: bool = False, origin: Origin | None = None):
    """Check every row (batched, on Arrow). strict: raise a BadRowsError naming the first bad rows
    (file:line or split and row, 1-based, and the reason). drop: keep the good rows. Returns (good
    rows, normalised, {reason kind: rows dropped}, {shape: good rows with it}, {rewrite: rows}, the good rows'
    digests, a function naming the good row at a position of them)."""
    import numpy as np
    import pandas as pd
    from datasets import Features, Json

    origin = origin or Origin(split)
    if "messages" in ds.column_names and "system" in ds.column_names:  # LLaMA-Factory's and Alpaca's layout
        raise BadRowsError(
            f"split {split!r} has a `system` column, which smolflow does not read (each row's system prompt "
            "would be lost): put it in each row as the first message, {role: system, content: ...}, and drop "
            "the column")
    if "messages" not in ds.column_names:
        raise BadRowsError(
            f"split {split!r} has no `messages` column (columns: {ds.column_names}); "
            "rows must be in smoltalk's schema: messages=[{role, content}, ...], or prompt/completion pairs, "
            "or ShareGPT's conversations=[{from, value}, ...]"
        )
    # Never from datasets' map cache: it keys module-level functions by name, not code, so a
    # cached result could predate a change to the checks. The result (a reason, a digest and a few
    # flags per row) is small enough to keep in memory.
    kwargs = {"tokens": list(tokens), "escape": escape}
    checked = ds.map(_check_batch, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                     keep_in_memory=True, num_proc=num_proc_for(len(ds), num_proc), fn_kwargs=kwargs,
                     features=_check_features(), desc=f"Checking {split}")
    column = checked.data.column
    problem_col = column("_problem")
    bad = problem_col.is_valid().to_numpy(zero_copy_only=False)
    # One vectorised pass over 16-byte digests (~150 MB at a million rows, measured; a list and a
    # dict of hex digests took ~190 MB).
    digests = pd.Series(column("_digest").to_numpy(zero_copy_only=False))
    duplicate = digests.duplicated(keep="first").to_numpy() & ~bad
    # Rows with a problem first, then duplicates: five copies of one line must not hide a broken row.
    rejected = np.concatenate([np.flatnonzero(bad), np.flatnonzero(duplicate)])

    def where(i) -> str:  # the row's place in the file as read, also after a shuffle or a limit
        return origin.where(ds._indices.column(0)[int(i)].as_py() if ds._indices is not None else int(i))

    def reason(i: int) -> str:
        if not duplicate[i]:
            return problem_col[int(i)].as_py()
        return f"duplicate of {where(np.flatnonzero((digests == digests[i]).to_numpy())[0])}"

    counts: dict[str, int] = {}
    for problem in problem_col.filter(problem_col.is_valid()).to_pylist():
        counts[reason_kind(problem)] = counts.get(reason_kind(problem), 0) + 1
    if duplicate.any():
        counts["duplicate row"] = int(duplicate.sum())
    shown = "; ".join(f"{where(i)}: {reason(i)}" for i in rejected[:5])
    if len(rejected) > 5:  # the rest by kind, so every kind of fix is named in one round
        shown += f"; and {len(rejected) - 5} more (all by kind: {', '.join(f'{n} {k}' for k, n in counts.items())})"
    if len(rejected) and policy == "strict":
        raise BadRowsError(
            f"{len(rejected)} bad row(s) in split {split!r}: {shown}. {FIX_ROWS}")
    if counts:
        log.warning("Dropping %d bad row(s) from split %r: %s", len(rejected), split, shown)
    keep = ~(bad | duplicate)
    shapes = {s: int(np.count_nonzero(column(f"_{s}").to_numpy(zero_copy_only=False) & keep)) for s in SHAPES}
    rewritten: dict[str, int] = {}
    changed = column("_rewritten")
    for i in np.flatnonzero(keep & changed.is_valid().to_numpy(zero_copy_only=False)):
        for change in changed[int(i)].as_py().split(","):
            rewritten[change] = rewritten.get(change, 0) + 1
    kept = np.flatnonzero(keep)
    ds = ds.select(kept) if len(rejected) else ds
    if rewritten:  # a second pass only when some row changes; JSON values keep every shape as written
        ds = ds.map(_normalize_batch, batched=True, remove_columns=ds.column_names, fn_kwargs=kwargs,
                    features=Features({"messages": Json()}), load_from_cache_file=False,
                    num_proc=num_proc_for(len(ds), num_proc), desc=f"Normalising {split}")
    return ds, counts, shapes, rewritten, digests.to_numpy()[kept], lambda k: where(kept[k])


def also_in(test: list, train: list) -> tuple[int, str]:
    """How many of the test split's rows are also train rows, and the first few, named. Each split as
    check_rows's last two: its good rows' digests, the function naming the row at a position of them."""
    import numpy as np
    import pandas as pd

    seen = np.flatnonzero(pd.Series(test[0]).isin(pd.Series(train[0])).to_numpy())  # hashed, as the duplicates
    twin = [np.flatnonzero(train[0] == test[0][i])[0] for i in seen[:3]]
    return len(seen), "; ".join(f"{test[1](i)} = {train[1](t)}" for i, t in zip(seen, twin))


def _checked_index(cfg: DataConfig, raw, tokens) -> Path:
    """Where the result of checking this data with these settings is recorded. The key uses
    datasets' own fingerprints of the loaded files (their paths and modification times, or the hub
    revision), so it changes whenever the data would be read afresh."""
    what = {"cfg": cfg.model_dump(mode="json"), "raw": {k: v._fingerprint for k, v in raw.items()},
            "code": code_digest(__name__), "tokens": sorted(tokens)}  # a change to the checks re-checks every dataset
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return cache_dir("datasets") / f"checked-{key[:16]}.json"


def _files_index(cfg: DataConfig, local: Path, tokens: list[str]) -> Path:
    """The same record for local data, keyed by its files' paths, sizes and modification times (as
    datasets' fingerprints of local files are, and stricter): an unchanged re-run finds it without
    importing datasets, ~1 s of a cached re-run's ~9 s."""
    builder, files = local_data_files(local)
    stats = {split: [[str(Path(f).resolve()), (st := os.stat(f)).st_size, st.st_mtime_ns] for f in names]
             for split, names in sorted(files.items())}
    what = {"cfg": cfg.model_dump(mode="json"), "builder": builder, "files": stats, "code": code_digest(__name__),
            "tokens": sorted(tokens), "datasets": version("datasets")}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return cache_dir("datasets") / f"files-{key[:16]}.json"


def _recorded(index: Path) -> DatasetRef | None:
    """The DatasetRef an earlier check recorded at `index`, if its saved copy is still there."""
    if not index.exists():
        return None
    ref = DatasetRef.model_validate_json(index.read_text(encoding="utf-8"))
    return ref if (Path(ref.path) / "dataset_dict.json").exists() else None


def hold_out(raw, origins: dict, cfg: DataConfig) -> tuple:
    """(raw, origins, what was done) with the test split carved out of the train split (data.test_size): rows
    picked with data.seed, the same every run, each part in the file's order (data.shuffle still
    applies after). Held-out rows keep their names (file:line) in every message about them."""
    import math

    import numpy as np
    from datasets import DatasetDict

    if cfg.test_split in raw:
        raise ValueError(f"data.test_size={cfg.test_size}: the dataset has its own {cfg.test_split!r} split; remove "
                         "data.test_size to evaluate on it, or set data.test_split to a name the dataset lacks")
    if cfg.train_split not in raw:
        return raw, origins, None  # load_chat_dataset names the missing split
    source, n = raw[cfg.train_split], len(raw[cfg.train_split])
    k = cfg.test_size if isinstance(cfg.test_size, int) else math.ceil(n * cfg.test_size)
    if not 0 < k < n:
        raise ValueError(f"data.test_size={cfg.test_size}: holds out {k} of the {n} rows of split {cfg.train_split!r}, "
                         f"leaving {max(n - k, 0)} to train on; hold out fewer (at most {n - 1})")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(cfg.seed).permutation(n)[:k]] = True
    parts, named = {}, {}
    for split, rows in ((cfg.train_split, np.flatnonzero(~held)), (cfg.test_split, np.flatnonzero(held))):
        parts[split] = part = source.select(rows)
        # datasets cuts consecutive rows as a slice of the table (no index map): count its offset.
        offset = int(rows[0]) if part._indices is None else 0
        named[split] = dataclasses.replace(origins[cfg.train_split], split=cfg.train_split,
                                           first=origins[cfg.train_split].first + offset)
    note = (f"{cfg.test_split} held out from {cfg.train_split}: {k} of its {n} rows, before checks and limits; "
            f"data.test_size={cfg.test_size}, seed {cfg.seed}")
    log.info("Dataset %s: %s", cfg.dataset, note)
    return DatasetDict({**raw, **parts}), {**origins, **named}, note


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[5, 30])
def load_chat_dataset(cfg: DataConfig, special_tokens: list[str] | None = None) -> DatasetRef:
    """Load the train/test splits, check every row, and save them for the stages that follow."""
    # Not cached by Prefect: loading is the step that reads the data as it is now. Unchanged data
    # (same files and settings) is checked once: the result is recorded under a key made of
    # datasets' own file fingerprints (local files: also by their sizes and times, found before
    # datasets is imported); the saved copy is content-addressed.
    # special_tokens: the model's (tasks/special_tokens.py); ChatML's when the caller has no model.
    tokens = sorted(set(CHATML_TOKENS if special_tokens is None else special_tokens))
    source, local = _source(cfg)
    if local is None and (subset := hub_subset(cfg, source)):
        source += f" (subset {subset})"
    quick = _files_index(cfg, local, tokens) if local is not None else None
    if quick is not None and (ref := _recorded(quick)) is not None:
        log.info("Dataset %s: unchanged since checked, %s rows", cfg.dataset, ref.rows)
        return ref
    from datasets import DatasetDict, load_from_disk

    raw, origins = load_raw(cfg)
    # pyarrow's allocator keeps the buffers freed while converting files to Arrow (~0.3 GiB for a
    # million rows); hand them back before the checks fork their worker processes.
    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    held_out = None
    if cfg.test_size is not None:
        raw, origins, held_out = hold_out(raw, origins, cfg)
    for key, split in (("train", cfg.train_split), ("test", cfg.test_split)):
        if split not in raw:
            # Its file is there in a format not read (a .csv, a .jsonl.gz): the splits listed below would
            # send the user looking for a missing file, or hold out a test split the data has.
            if unread := (unread_files(local, split) if local is not None else []):
                raise ValueError(
                    f"data.{key}_split={split!r}: {', '.join(str(p) for p in unread)} is not read (smolflow reads "
                    "uncompressed .json, .jsonl and .parquet files); convert it to JSON Lines or Parquet"
                )
            carve = " or hold out part of the train split with data.test_size (e.g. 0.05)" if key == "test" else ""
            raise ValueError(
                f"data.{key}_split={split!r} is not in the dataset (splits: {sorted(raw)}); "
                f"set data.{key}_split to one of them{carve}"
            )
    index = _checked_index(cfg, raw, tokens)
    if (ref := _recorded(index)) is not None:
        log.info("Dataset %s: unchanged since checked, %s rows", cfg.dataset, ref.rows)
        if quick is not None:
            atomic_write(quick, ref.model_dump_json())
        return ref
    splits, dropped, shapes, rewritten = {}, {}, dict.fromkeys(SHAPES, 0), {}
    layout = layout_of(raw[cfg.train_split])
    limits = {"train": cfg.max_train_rows, "test": cfg.max_test_rows}
    escape = cfg.special_tokens_in_text == "escape"
    checked: dict[str, list] = {}  # split -> [good rows' digests, their names] (check_rows)
    bad = []  # strict: both splits' bad rows in one message, not the test split's only once the train split's are fixed
    for key, split in (("train", cfg.train_split), ("test", cfg.test_split)):
        ds, limit = as_messages(raw[split], split), limits[key]
        if cfg.shuffle:  # before the limit, so a limit takes a seed-fixed random sample
            ds = ds.shuffle(seed=cfg.seed)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        try:
            ds, dropped[key], found, rewritten[key], *checked[key] = check_rows(
                ds, split, cfg.bad_rows, tokens=tokens, escape=escape, origin=origins[split])
        except BadRowsError as err:
            bad.append(str(err))
            continue
        if rewritten[key]:
            log.info("Rewrote rows of split %r (kept): %s", split, rewritten[key])
        shapes = {s: shapes[s] + found[s] for s in SHAPES}
        splits[key] = ds.select_columns(["messages"])
    if bad:
        fix = f" {FIX_ROWS}" if any(b.endswith(FIX_ROWS) for b in bad) else ""
        raise BadRowsError(" ".join(b.removesuffix(fix) for b in bad) + fix)
    test_in_train, named = also_in(checked["test"], checked["train"])
    if test_in_train:
        log.warning("%d of the %d rows of split %r are also rows of split %r (%s%s): the eval loss partly measures "
                    "what was memorised; remove them from one of the two", test_in_train, len(splits["test"]),
                    cfg.test_split, cfg.train_split, named, "; ..." if test_in_train > 3 else "")
    fingerprint = hashlib.sha256("".join(ds._fingerprint for ds in splits.values()).encode()).hexdigest()
    target = cache_dir("datasets") / fingerprint[:16]
    if not (target / "dataset_dict.json").exists():
        with atomic_dir(target) as staging:
            DatasetDict(splits).save_to_disk(str(staging))
    saved = load_from_disk(str(target))
    log.info("Dataset %s: %s", cfg.dataset, {k: len(v) for k, v in saved.items()})
    ref = DatasetRef(
        source=source, path=str(target), fingerprint=fingerprint, rows={k: len(v) for k, v in saved.items()},
        dropped=dropped, shapes=shapes, special_tokens_in_text=cfg.special_tokens_in_text, special_tokens=tokens,
        rewritten=rewritten, held_out=held_out, layout=layout, test_in_train=test_in_train,
        test_digest=hashlib.sha256(b"".join(checked["test"][0])).hexdigest(),
    )
    for record in (index, quick):
        if record is not None:
            atomic_write(record, ref.model_dump_json())
    return ref
