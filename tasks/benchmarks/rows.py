"""Reading and writing the benchmarks' local row files (.json/.jsonl/.parquet)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.yamlfile import KeyTwice, json_loads


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a local .json/.jsonl/.parquet file; a line that is not a JSON object is named file:line."""
    if path.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            return json_loads(text)
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
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    # ASCII escapes: the file round-trips any row, whatever line breaks its strings hold.
    path.write_text("".join(json.dumps(r, ensure_ascii=True, default=_plain) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _plain(value):  # numpy values from parquet rows
    return value.tolist() if hasattr(value, "tolist") else str(value)
