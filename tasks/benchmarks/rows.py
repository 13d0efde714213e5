"""Reading and writing the benchmarks' local row files (.json/.jsonl/.parquet)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.yamlfile import KeyTwice, json_loads


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a local .json/.jsonl/.parquet file; a line that is not a JSON object is named file:line."""
    return [row for _, row in read_numbered(path)]


def read_numbered(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) per row, `where` as an error message names it: `file:line` (1-based, blank lines
    counted, so an editor jumps there), or `file row N` (1-based) where a row has no line of its own."""
    if path.endswith(".parquet"):
        import pandas as pd

        return _counted(path, pd.read_parquet(path).to_dict("records"))
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            return _counted(path, json_loads(text))
        except KeyTwice as err:
            raise ValueError(f"{path}: {err}") from None
    rows = []
    # Split on "\n" only: str.splitlines also breaks at U+0085 and U+2028, which real rows contain
    # inside their strings (two cais/mmlu "all" test rows hold U+0085).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json_loads(line)
        except KeyTwice as err:
            raise ValueError(f"{path}:{number}: {err}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                             "fix that line (one JSON object per line)") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{number}", row))
    return rows


def _counted(path: str, rows: list) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path} row {number}", row) for number, row in enumerate(rows, start=1)]


def need_strings(where: str, row: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Raise, naming the row and the fields, unless each of `fields` is a string there: lm-eval
    would fail on the row mid-evaluation, with a traceback, after the model is loaded."""
    bad = [f for f in fields if not isinstance(row.get(f), str)]
    if bad:
        raise ValueError(f"{where}: need string field(s) {', '.join(f'`{f}`' for f in fields)}; "
                         f"missing or not a string: {', '.join(bad)}")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    # ASCII escapes: the file round-trips any row, whatever line breaks its strings hold.
    path.write_text("".join(json.dumps(r, ensure_ascii=True, default=_plain) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _plain(value):  # numpy values from parquet rows
    return value.tolist() if hasattr(value, "tolist") else str(value)
