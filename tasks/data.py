"""Data stage: load a chat dataset in smoltalk's `messages` schema and check every row.

Sources: a hub id (`load_dataset(id, subset)`), local .json/.jsonl/.parquet files or a directory
of them (split taken from each file's name: train.jsonl, test-00000.parquet, ...), or the
fixture shipped in tasks/fixtures/ (the offline default).

Rows may also carry the seed's richer shapes: assistant `tool_calls`
([{type: function, function: {name, arguments}}], content then optional), `role: tool` replies,
and content as a list of parts ([{type: text, text}, {type: image, ...}]). They are checked like
plain turns and counted in `DatasetRef.shapes`, so the template stage can insist on a template
that renders them.

Scale: every pass is a batched `datasets.map` over memory-mapped Arrow (several processes for big
splits); what stays in memory is one short digest and flag per row, never the conversations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.config import DataConfig
from tasks.runtime import FIXTURES, atomic_dir, atomic_write, cache_dir, default_threads, hub_offline, retry_transient, split_of

log = logging.getLogger(__name__)

HUB_DEFAULT = ("HuggingFaceTB/smoltalk", "everyday-conversations")
FIXTURE_PREFIX = "fixture:"
ROLES = {"system", "user", "assistant", "tool"}
PART_TYPES = ("text", "image")
SHAPES = ("tool_calls", "tool_messages", "multimodal")
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Below this many rows, starting worker processes costs more than it saves.
PARALLEL_FROM_ROWS = 20_000
# Part of the checked-data cache key: a change to the checks must re-check every dataset.
_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


class DatasetRef(BaseModel):
    """A prepared dataset on local disk (datasets' Arrow format) and what it is."""

    source: str
    path: str
    fingerprint: str
    rows: dict[str, int]
    dropped: dict[str, dict[str, int]] = {}  # split -> {reason: rows dropped} (data.bad_rows='drop')
    # Rows (both splits) with assistant tool_calls, with role-tool replies, with content given as a
    # list of parts: the template must render these (tasks/templates.py checks it).
    shapes: dict[str, int] = {}

    def markdown(self) -> str:
        """Source, rows per split, fingerprint and dropped rows by reason, for the report."""
        rows = " · ".join(f"{split}: {n} rows" for split, n in self.rows.items())
        dropped = "".join(
            f"\nDropped from {split}: " + ", ".join(f"{n} × {reason}" for reason, n in counts.items()) + "\n"
            for split, counts in self.dropped.items() if counts
        )
        return f"Source `{self.source}` · {rows} · fingerprint `{self.fingerprint}`\n{dropped}"


class BadRowsError(ValueError):
    pass


def num_proc_for(rows: int, num_proc: int | None = None) -> int | None:
    """`num_proc` for a map over `rows` rows: None (this process) for small data, every core for
    big data. Never 1: datasets would still start one worker process for it."""
    if num_proc is None:
        num_proc = 1 if rows < PARALLEL_FROM_ROWS else min(default_threads(), 8)
    return num_proc if num_proc > 1 else None


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
        splits.setdefault(split_of(f), []).append(str(f))
    return builders.pop(), splits


def load_raw(cfg: DataConfig):
    """The DatasetDict the config names, before any checks."""
    from datasets import DatasetDict, load_dataset

    source = cfg.dataset
    if source == "auto":
        source = FIXTURE_PREFIX + "everyday-conversations" if hub_offline() else HUB_DEFAULT[0]
    if source.startswith(FIXTURE_PREFIX):
        name = source.removeprefix(FIXTURE_PREFIX).replace("-", "_")
        if not (FIXTURES / name).is_dir():
            raise ValueError(f"data.dataset={cfg.dataset!r}: no shipped fixture {name!r}")
    local = FIXTURES / name if source.startswith(FIXTURE_PREFIX) else Path(source).expanduser()
    if local.exists():
        builder, files = local_data_files(local)
        # Split by split: datasets otherwise fixes the schema from the first split it reads and
        # casts the others to it (failing, or turning their lists of parts into strings).
        return DatasetDict({split: _load_split(cfg, builder, files, split) for split in files})
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


def _load_split(cfg: DataConfig, builder: str, files: dict[str, list[str]], split: str):
    """One split of local files, every row's shape kept as written."""
    from datasets import load_dataset

    try:
        ds = load_dataset(builder, data_files={split: files[split]}, split=split)
        if builder != "json" or not _casts_parts_to_strings(ds):
            return ds
    except Exception as err:  # datasets wraps Arrow's cast errors in several types
        if builder != "json":
            raise _unreadable(cfg, files, err) from err
    # datasets' JSON loader fixes the schema from the first rows it reads and casts every later
    # row to it: a `tool_calls` first seen later fails the cast, and content given as a list of
    # parts later is silently turned into a JSON string. Reading each field as a JSON value keeps
    # every shape as written (~5x slower to load, so only for such data).
    try:
        return load_dataset(builder, data_files={split: files[split]}, split=split,
                            features=_json_features(files[split]))
    except Exception as err:
        raise _unreadable(cfg, files, err) from err


def _unreadable(cfg: DataConfig, files, err: Exception) -> BadRowsError:
    return BadRowsError(
        f"data.dataset={cfg.dataset!r}: could not read {files} as one table ({str(err).splitlines()[0]}). "
        "Usually a field has different types in different rows, e.g. `messages` a string in some "
        "and a list of {role, content} in others: make every row's `messages` such a list."
    )


def _casts_parts_to_strings(ds) -> bool:
    """Whether some message content loaded as a string that is a JSON list: what the JSON loader
    makes of a list of parts when earlier rows fixed `content` as a string. Arrow-level scan."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "messages" not in ds.column_names:
        return False
    column = ds.data.column("messages")
    item = column.type.value_type if pa.types.is_list(column.type) else None
    if not (pa.types.is_struct(item) and item.get_field_index("content") >= 0
            and pa.types.is_string(item.field("content").type)):
        return False
    return any(pc.any(pc.starts_with(pc.list_flatten(chunk).field("content"), "[{")).as_py() for chunk in column.chunks)


def _json_features(files: list[str]):
    """Features that read each top-level field (taken from the first row) as a JSON value of any
    shape, `messages` included: the row checks then name what is wrong with a row."""
    from datasets import Features, Json

    with open(files[0], encoding="utf-8") as f:
        head = f.read(1)
        f.seek(0)
        row = json.load(f)[0] if head == "[" else json.loads(f.readline())
    return Features(dict.fromkeys(row, Json()))


def as_written(messages: list[dict]) -> list[dict]:
    """A conversation without the null fields Arrow adds so that all rows share one schema (a
    `tool_calls: None` on every plain turn, `text: None` on image parts): templates test `is
    defined`, so those nulls must not reach them."""
    def strip(value, key=None):
        if key == "arguments":  # the caller's own data, nulls included
            return value
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, dict):
            return {k: strip(v, k) for k, v in value.items() if v is not None or k == "content"}
        return value

    return strip(messages)


def _content_problem(i: int, m: dict) -> str | None:
    content = m.get("content")
    if isinstance(content, list):  # multimodal: a list of {type: text|image} parts
        if not content:
            return f"messages[{i}].content is an empty list of parts"
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                return (f"messages[{i}].content[{j}] has type {kind!r}, expected a part "
                        "{type: 'text', text: ...} or {type: 'image', ...}")
            if kind == "text" and (not isinstance(part.get("text"), str) or not part["text"].strip()):
                return f"messages[{i}].content[{j}] is a text part without text"
        return None
    if content in (None, "") and m.get("tool_calls"):
        return None  # an assistant turn that only calls tools
    if not isinstance(content, str) or not content.strip():
        return f"messages[{i}].content is empty or not a string (nor a list of {{type: text|image}} parts)"
    return None


def _tool_calls_problem(i: int, m: dict) -> str | None:
    calls = m.get("tool_calls")
    if calls is None:
        return None
    if m["role"] != "assistant":
        return f"messages[{i}] has tool_calls but role {m['role']!r} (only assistant turns call tools)"
    if not isinstance(calls, list) or not calls:
        return f"messages[{i}].tool_calls is not a non-empty list"
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"] \
                or call.get("type", "function") not in ("function", None):
            return (f"messages[{i}].tool_calls[{j}] is not {{type: 'function', function: {{name, arguments}}}} "
                    "(the seed's {tool: N, parameters: P} is written {type: 'function', function: "
                    "{name: N, arguments: P}})")
        if not isinstance(fn.get("arguments"), (dict, str)):
            return f"messages[{i}].tool_calls[{j}].function.arguments is not an object or a JSON string"
    return None


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
        if problem := _tool_calls_problem(i, m) or _content_problem(i, m):
            return problem
    if any(m["role"] == "system" for m in messages[1:]):
        return "a system message that is not first (templates only accept it as messages[0])"
    for i in range(1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"] in ("user", "assistant"):
            return f"messages[{i - 1}] and messages[{i}] are both {messages[i]['role']!r} turns (roles must alternate)"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to learn from"
    return None


def row_shapes(messages: list[dict]) -> tuple[bool, bool, bool]:
    """(calls tools, has tool replies, has content as a list of parts) for a good row."""
    return (any(m.get("tool_calls") for m in messages), any(m["role"] == "tool" for m in messages),
            any(isinstance(m.get("content"), list) for m in messages))


def reason_kind(problem: str) -> str:
    """A problem without its row's particulars (indices, values), for counting by reason."""
    if problem.startswith("duplicate"):
        return "duplicate row"
    kind = re.sub(r"\[\d+\]", "[i]", problem)
    kind = re.sub(r"\.role is .*", ".role is not a known role", kind)
    kind = re.sub(r"has type .*", "has an unknown part type", kind)
    return kind.split(" (")[0]


def _check_batch(batch):
    out = {"_problem": [], "_digest": [], **{f"_{s}": [] for s in SHAPES}}
    for messages in batch["messages"]:
        problem = row_problem(messages)
        out["_problem"].append(problem)
        # 16 bytes of a digest per row find duplicates later without holding conversations in memory.
        out["_digest"].append(hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()[:16])
        for shape, flag in zip(SHAPES, row_shapes(messages) if problem is None else (False,) * 3):
            out[f"_{shape}"].append(flag)
    return out


def _pairs_to_messages(batch):
    def turns(value, role):  # TRL's two forms: plain text, or a list of messages (conversational)
        return list(value) if isinstance(value, list) else [{"role": role, "content": value}]

    return {"messages": [turns(p, "user") + turns(c, "assistant") for p, c in zip(batch["prompt"], batch["completion"])]}


def as_messages(ds, split: str):
    """Rows in `messages` form: prompt/completion pairs (TRL's schema, text or conversational) become a
    user turn and an assistant turn, then face the same checks as any conversation."""
    if "messages" in ds.column_names or not {"prompt", "completion"} <= set(ds.column_names):
        return ds
    log.info("Split %r has prompt/completion columns: turning each pair into a user and an assistant turn", split)
    return ds.map(_pairs_to_messages, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                  desc=f"prompt/completion -> messages ({split})")


def check_rows(ds, split: str, policy: str = "strict", num_proc: int | None = None):
    """Check every row (batched, on Arrow). strict: raise a BadRowsError naming the first bad rows
    (split, index, field, reason). drop: keep the good rows. Returns (good rows, {reason kind:
    rows dropped}, {shape: good rows with it})."""
    import numpy as np
    import pandas as pd

    if "messages" not in ds.column_names:
        raise BadRowsError(
            f"split {split!r} has no `messages` column (columns: {ds.column_names}); "
            "rows must be in smoltalk's schema: messages=[{role, content}, ...], or prompt/completion pairs"
        )
    # Never from datasets' map cache: it keys module-level functions by name, not code, so a
    # cached result could predate a change to the checks. The result (a reason, a digest and three
    # flags per row) is small enough to keep in memory.
    checked = ds.map(_check_batch, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                     keep_in_memory=True, num_proc=num_proc_for(len(ds), num_proc), desc=f"Checking {split}")
    column = checked.data.column
    problem_col = column("_problem")
    bad = problem_col.is_valid().to_numpy(zero_copy_only=False)
    # One vectorised pass over 16-byte digests (~150 MB at a million rows, measured; a list and a
    # dict of hex digests took ~190 MB).
    digests = pd.Series(column("_digest").to_numpy(zero_copy_only=False))
    duplicate = digests.duplicated(keep="first").to_numpy() & ~bad
    rejected = np.flatnonzero(bad | duplicate)

    def file_row(i) -> int:  # the row's index in the split as read, also after a shuffle or a limit
        return ds._indices.column(0)[int(i)].as_py() if ds._indices is not None else int(i)

    def reason(i: int) -> str:
        if not duplicate[i]:
            return problem_col[int(i)].as_py()
        return f"duplicate of row {file_row(np.flatnonzero((digests == digests[i]).to_numpy())[0])}"

    if len(rejected) and policy == "strict":
        shown = "; ".join(f"row {file_row(i)}: {reason(i)}" for i in rejected[:5])
        raise BadRowsError(
            f"{len(rejected)} bad row(s) in split {split!r}: {shown}. Fix or remove these rows, "
            "or set data.bad_rows='drop' to train without them."
        )
    counts: dict[str, int] = {}
    if duplicate.any():
        counts["duplicate row"] = int(duplicate.sum())
    for problem in problem_col.filter(problem_col.is_valid()).to_pylist():
        counts[reason_kind(problem)] = counts.get(reason_kind(problem), 0) + 1
    keep = ~(bad | duplicate)
    shapes = {s: int(np.count_nonzero(column(f"_{s}").to_numpy(zero_copy_only=False) & keep)) for s in SHAPES}
    return (ds.select(np.flatnonzero(keep)) if len(rejected) else ds), counts, shapes


def _checked_index(cfg: DataConfig, raw) -> Path:
    """Where the result of checking this data with these settings is recorded. The key uses
    datasets' own fingerprints of the loaded files (their paths and modification times, or the hub
    revision), so it changes whenever the data would be read afresh."""
    what = {"cfg": cfg.model_dump(mode="json"), "raw": {k: v._fingerprint for k, v in raw.items()}, "code": _CODE}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return cache_dir("datasets") / f"checked-{key[:16]}.json"


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[5, 30])
def load_chat_dataset(cfg: DataConfig) -> DatasetRef:
    """Load the train/test splits, check every row, and save them for the stages that follow."""
    # Not cached by Prefect: loading is the step that reads the data as it is now. Unchanged data
    # (same files and settings) is checked once: the result is recorded under a key made of
    # datasets' own file fingerprints; the saved copy is content-addressed.
    from datasets import DatasetDict, load_from_disk

    raw = load_raw(cfg)
    # pyarrow's allocator keeps the buffers freed while converting files to Arrow (~0.3 GiB for a
    # million rows); hand them back before the checks fork their worker processes.
    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    for key, split in (("train", cfg.train_split), ("test", cfg.test_split)):
        if split not in raw:
            raise ValueError(
                f"data.{key}_split={split!r} is not in the dataset (splits: {sorted(raw)}); "
                f"set data.{key}_split to one of them"
            )
    index = _checked_index(cfg, raw)
    if index.exists():
        ref = DatasetRef.model_validate_json(index.read_text())
        if (Path(ref.path) / "dataset_dict.json").exists():
            log.info("Dataset %s: unchanged since checked, %s rows", cfg.dataset, ref.rows)
            return ref
    splits, dropped, shapes = {}, {}, dict.fromkeys(SHAPES, 0)
    limits = {"train": cfg.max_train_rows, "test": cfg.max_test_rows}
    for key, split in (("train", cfg.train_split), ("test", cfg.test_split)):
        ds, limit = as_messages(raw[split], split), limits[key]
        if cfg.shuffle:  # before the limit, so a limit takes a seed-fixed random sample
            ds = ds.shuffle(seed=cfg.seed)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        ds, dropped[key], found = check_rows(ds, split, cfg.bad_rows)
        if dropped[key]:
            log.warning("Dropped %d bad row(s) from split %r: %s", sum(dropped[key].values()), split, dropped[key])
        shapes = {s: shapes[s] + found[s] for s in SHAPES}
        splits[key] = ds.select_columns(["messages"])
    fingerprint = hashlib.sha256("".join(ds._fingerprint for ds in splits.values()).encode()).hexdigest()
    target = cache_dir("datasets") / fingerprint[:16]
    if not (target / "dataset_dict.json").exists():
        with atomic_dir(target) as staging:
            DatasetDict(splits).save_to_disk(str(staging))
    saved = load_from_disk(str(target))
    log.info("Dataset %s: %s", cfg.dataset, {k: len(v) for k, v in saved.items()})
    ref = DatasetRef(
        source=cfg.dataset, path=str(target), fingerprint=fingerprint, rows={k: len(v) for k, v in saved.items()},
        dropped=dropped, shapes=shapes,
    )
    atomic_write(index, ref.model_dump_json())
    return ref
