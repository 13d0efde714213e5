"""Local data files: which files make which split, reading each split with every row kept as
written, and where a row came from (`train.jsonl:7`) for the messages that name it.

JSON that Arrow cannot read as one table (a line that is not JSON, or not an object, or shapes that
do not cast to the schema datasets fixed from the first rows) is read line by line instead: lines
split on '\\n' only (JSON strings may hold U+2028, which `str.splitlines` would split on), each row
kept as a JSON value, a broken line kept as a bad row that the row checks name and count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tasks.runtime import cache_dir, split_of
from tasks.yamlfile import KeyTwice, json_loads, unique_keys

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
READ_PROBLEM = "_read_problem"  # column of the line-by-line reader: why a line is not a row


class UnreadableError(ValueError):
    pass


def local_data_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    """(builder, {split: [files]}) for a local file or directory of json/jsonl/parquet files."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in FORMATS)
    if not files:
        raise ValueError(f"data.dataset={str(path)!r}: no .json, .jsonl or .parquet files there")
    builders = {FORMATS.get(f.suffix) for f in files}
    if None in builders or len(builders) > 1:
        raise ValueError(f"data.dataset={str(path)!r}: use one format, .json/.jsonl or .parquet")
    if path.is_file():
        return builders.pop(), {"train": [str(path)]}
    splits: dict[str, list[str]] = {}
    for f in files:
        splits.setdefault(split_of(f), []).append(str(f))
    return builders.pop(), splits


def unread_files(path: Path, split: str) -> list[Path]:
    """Files of a data directory named for `split` that local_data_files does not read: another
    format (train.csv, train.jsonl.gz, train.JSONL). A split missing for that reason is said so."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix not in FORMATS and split_of(p) == split)


def _is_array(file: str) -> bool:
    with open(file, "rb") as f:
        return f.read(4096).lstrip()[:1] == b"["


@lru_cache(maxsize=16)
def _row_lines(file: str, stamp: tuple) -> list[int]:
    """The 1-based line of each row of a JSON-lines file: blank lines hold no row (as datasets reads it)."""
    with open(file, "rb") as f:  # binary lines end at b"\n" only
        return [n for n, line in enumerate(f, 1) if line.strip()]


def _row_count(file: str, builder: str) -> int:
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows
    if _is_array(file):
        with open(file, encoding="utf-8") as f:
            return len(json.load(f))
    return len(_row_lines(file, _stamp(file)))


def _stamp(file: str) -> tuple:
    st = os.stat(file)
    return st.st_mtime_ns, st.st_size


@dataclass
class Origin:
    """Where the rows of one split come from; `where(i)` names row i (0-based, as read) for people."""

    split: str
    builder: str = ""
    files: list[str] = field(default_factory=list)  # in read order; none for hub data
    first: int = 0  # rows of the source before row 0: a split cut out of another as one slice (data.test_size)

    def where(self, row: int) -> str:
        row += self.first
        for file in self.files:
            n = _row_count(file, self.builder)
            if row < n:
                if self.builder == "json" and not _is_array(file):
                    return f"{file}:{_row_lines(file, _stamp(file))[row]}"
                return f"{file} row {row + 1}"
            row -= n
        return f"split {self.split!r} row {row + 1}"


def _array_values(data: bytes):
    """The rows of a JSON array that json has read whole: each again, keys checked, one by one."""
    text = data.decode(json.detect_encoding(data))
    plain, checked = json.JSONDecoder(), json.JSONDecoder(object_pairs_hook=unique_keys)
    at = text.index("[") + 1
    while True:
        while text[at] in " \t\r\n,":
            at += 1
        if text[at] == "]":
            return
        try:
            value, end = checked.raw_decode(text, at)
            yield value, None
        except KeyTwice as err:
            end = plain.raw_decode(text, at)[1]
            yield None, str(err)
        at = end


def _values(file: str):
    """Each row of a JSON array or JSON-lines file as (value, None), or (None, why it is not JSON)."""
    if _is_array(file):  # one document: unreadable means the whole file is
        with open(file, "rb") as f:
            data = f.read()
        try:
            json.loads(data)  # bytes: UTF-8 (with or without a byte-order mark)
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise UnreadableError(f"{file}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                                  "save the file as UTF-8") from err
        except json.JSONDecodeError as err:
            raise UnreadableError(f"{file}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                                  "fix the syntax, or write the rows as JSON lines (one object per line)") from err
        yield from _array_values(data)
        return
    with open(file, "rb") as f:
        for line in f:  # binary lines end at b"\n" only, one at a time
            if not line.strip():
                continue  # as datasets reads it: no row (Origin counts lines the same way)
            try:
                yield json_loads(line), None
            except KeyTwice as err:
                yield None, str(err)
            except UnicodeDecodeError:
                yield None, "not valid JSON (not UTF-8 text)"
            except json.JSONDecodeError as err:
                yield None, f"not valid JSON ({err.msg} at column {err.colno})"


def _line_rows(files: list[str], stamps: list[tuple]):
    """Rows of JSON / JSON-lines files one by one; `stamps` (mtime, size) make datasets' generator
    cache miss when a file changes."""
    from tasks.rows import pairs_to_messages, sharegpt_problem, sharegpt_to_messages

    for file in files:
        for value, problem in _values(file):
            if problem is None and not isinstance(value, dict):
                problem = f"a JSON {type(value).__name__}, not an object with `messages`"
            if problem is not None:
                yield {"messages": None, READ_PROBLEM: problem}
            elif "messages" not in value and {"prompt", "completion"} <= set(value):
                yield {"messages": pairs_to_messages(value["prompt"], value["completion"]), READ_PROBLEM: None}
            elif "messages" not in value and "conversations" in value:  # ShareGPT, as tasks/data.py reads it
                conversation = value["conversations"]
                yield {"messages": sharegpt_to_messages(conversation, value.get("system")),
                       READ_PROBLEM: sharegpt_problem(conversation)}
            elif "messages" in value and "system" in value:  # as tasks/data.py refuses the column: never lost silently
                yield {"messages": None, READ_PROBLEM: "a `system` field next to `messages`, which smolflow does not "
                       "read: put it in the row as the first message, {role: system, content: ...}"}
            else:
                yield {"messages": value.get("messages"), READ_PROBLEM: None}


def read_lines(files: list[str], arrow: Path):
    """A split read row by row: `messages` as JSON values plus why a row could not be read."""
    from datasets import Dataset, Features, Json, Value

    features = Features({"messages": Json(), READ_PROBLEM: Value("string")})
    try:
        return Dataset.from_generator(_line_rows, features=features, cache_dir=str(arrow),
                                      gen_kwargs={"files": files, "stamps": [_stamp(f) for f in files]})
    except Exception as err:  # datasets wraps what the generator raised in its own error
        if isinstance(err.__cause__, UnreadableError):
            raise err.__cause__ from None
        raise


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


@lru_cache(maxsize=16)
def _key_twice(file: str, stamp: tuple) -> bool:
    """Whether a JSON array file has an object with a key twice (datasets' loader would keep the last
    silently; Arrow's JSON-lines reader refuses such a line, and smolflow then reads line by line)."""
    try:
        with open(file, "rb") as f:
            json.load(f, object_pairs_hook=unique_keys)
    except KeyTwice:
        return True
    except ValueError:  # not JSON or not UTF-8: the readers below name that
        pass
    return False


def _utf8(file: str) -> bool:
    """Whether the whole file is UTF-8 text (Arrow's JSON reader passes other bytes through into
    strings that fail only when a row is read)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


# datasets keeps an Arrow copy of the local files it reads, a new one (in ~/.cache/huggingface)
# each time a file changes: a nightly on data that changes daily grew it by a copy a night. The
# copies go to SMOLFLOW_CACHE/datasets/arrow-<files> instead, where only the newest is kept.
OTHERS_WRITING_S = 600  # a copy younger than this may be another process's, still being written


def _arrow_dir(files: list[str]) -> Path:
    """Where datasets keeps its Arrow copies of these files (by path: one folder whatever they hold)."""
    key = hashlib.sha256("\n".join(sorted(os.path.realpath(f) for f in files)).encode()).hexdigest()[:16]
    return cache_dir("datasets", f"arrow-{key}")


def _keep_only(ds, arrow: Path):
    """`ds`, after deleting the Arrow copies in `arrow` that it does not read (earlier versions of
    the files; Linux keeps a deleted file readable while another process has it mapped)."""
    used = [Path(f["filename"]).resolve() for f in ds.cache_files]
    kept = {p.name for u in used for p in u.parents}
    old = time.time() - OTHERS_WRITING_S
    for path in [p for builder in arrow.iterdir() if builder.is_dir() for p in builder.iterdir()]:
        if path.name not in kept and path.stat().st_mtime < old:
            shutil.rmtree(path, ignore_errors=True)
    for lock in arrow.glob("*.lock"):  # datasets' lock file per copy, named after it
        if not any(name in lock.name for name in kept if name.startswith("default-")) and lock.stat().st_mtime < old:
            lock.unlink(missing_ok=True)
    return ds


JSON_LOGGER = "datasets.packaged_modules.json.json"


@contextlib.contextmanager
def _unlogged(name: str):
    """Silence a library logger for a while, unless verbose (its ERROR lines read like a crash)."""
    from tasks.console import verbose

    logger = logging.getLogger(name)
    before = logger.level
    if not verbose():
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(before)


def read_split(dataset: str, builder: str, files: list[str], split: str):
    """One split of local files, every row's shape kept as written."""
    from datasets import load_dataset

    if builder == "json" and not any(_row_lines(f, _stamp(f)) for f in files):
        raise UnreadableError(f"data.dataset={dataset!r}: split {split!r} has no rows ({', '.join(files)} "
                              "empty or blank); add rows in the `messages` schema, or remove the file")
    arrow = _arrow_dir(files)
    if builder == "json" and not all(_utf8(f) for f in files):
        return _keep_only(read_lines(files, arrow), arrow)  # a line that is not UTF-8: a bad row naming its line
    if builder == "json" and any(_is_array(f) and _key_twice(f, _stamp(f)) for f in files):
        return _keep_only(read_lines(files, arrow), arrow)  # the row with a key twice: a bad row, named
    try:
        with _unlogged(JSON_LOGGER):  # a JSON line datasets cannot parse is read below, and named if bad
            ds = load_dataset(builder, data_files={split: files}, split=split, cache_dir=str(arrow))
        if builder != "json" or not _casts_parts_to_strings(ds):
            return _keep_only(ds, arrow)
    except Exception as err:  # datasets wraps Arrow's parse and cast errors in several types
        if builder != "json":
            raise UnreadableError(
                f"data.dataset={dataset!r}: could not read {files} ({str(err).splitlines()[0]}); "
                "is every file a parquet file with the same columns?"
            ) from err
    # datasets' JSON loader fixes the schema from the first rows it reads and casts every later row
    # to it (content given as a list of parts later is silently turned into a JSON string), and one
    # line that is not a JSON object fails the whole file: read such files line by line.
    return _keep_only(read_lines(files, arrow), arrow)
