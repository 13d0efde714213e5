"""Markdown artifacts for Prefect's UI: every one goes through `publish_markdown`, which keeps
tables narrow enough for the artifact pane.

Prefect 3.9's markdown renderer sets `white-space: nowrap` on table cells and hides the table's
scrollbar, so a row wider than the pane is cut off with nothing to scroll. The run folder's
report.md and report.html keep their full tables; only the UI copy is narrowed: the widest columns
move out of the table into a list under it, each item named by the row's first cell.
"""

from __future__ import annotations

import functools
import html
import re
from uuid import UUID

# Characters a table row may take, PAD per column included. Measured in Prefect 3.9's UI at a
# 1280-px-wide window: a markdown table gets 708 px, about 7.2 px per character of its 14-px font plus
# 24 px of padding per cell (98 characters in all); 92 leaves room for wider glyphs (capitals, emoji).
ROW_BUDGET = 92
PAD = 3

_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MARKUP = re.compile(r"\*\*|__|\\(?=[|*_`\\])")
_CODE = re.compile(r"`([^`]*)`|<code>(.*?)</code>")
_TAG = re.compile(r"</?[A-Za-z][^>]*>")


def cell_width(cell: str) -> int:
    """About how many characters wide a cell renders: its longest line (`<br>` breaks lines), without
    markup, tags or entities; code spans count a fifth more (monospace in a padded chip)."""
    widest = 0
    for line in re.split(r"<br\s*/?>", cell):
        line = _MARKUP.sub("", _LINK.sub(r"\1", line))
        code = sum(len(html.unescape(a or b)) // 5 + 1 for a, b in _CODE.findall(line))
        widest = max(widest, len(html.unescape(_TAG.sub("", line.replace("`", "")))) + code)
    return widest


def split_row(line: str) -> list[str]:
    """A table row's cells; escaped pipes (`\\|`) stay inside their cell, as in GFM."""
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def narrow_table(lines: list[str], budget: int = ROW_BUDGET) -> list[str]:
    """One GFM table (header, delimiter, rows) as lines that fit `budget`: unchanged when it fits;
    else its widest columns (never the first) move to a list under it. A table left with only its
    first column becomes just the list."""
    header, align, rows = split_row(lines[0]), split_row(lines[1]), [split_row(x) for x in lines[2:]]
    n = len(header)
    rows = [(r + [""] * n)[:n] for r in rows]
    align = (align + ["---"] * n)[:n]
    widths = [max(cell_width(c) for c in [header[j]] + [r[j] for r in rows]) for j in range(n)]
    cost = lambda cols: sum(widths[j] + PAD for j in cols)  # noqa: E731
    keep = list(range(n))
    while cost(keep) > budget and len(keep) > 1:
        keep.remove(max(keep[1:], key=lambda j: widths[j]))
    if len(keep) == n:
        return lines
    moved = [j for j in range(n) if j not in keep]
    items = []
    label = lambda h, v: f"{h}: {v}" if h else v  # noqa: E731
    for r in rows:
        values = [(header[j], r[j]) for j in moved if r[j] not in ("", "-")]
        key = f"**{r[0]}**" if r[0] and "*" not in r[0] else r[0]
        if not values:
            if len(keep) == 1:  # no table left to show the row in
                items.append(f"- {key}")
        elif len(values) == 1:
            items.append(f"- {key} · {label(*values[0])}")
        else:
            items.append(f"- {key}\n" + "\n".join(f"  - {label(h, v)}" for h, v in values))
    out = []
    if len(keep) > 1:
        out = [_row([header[j] for j in keep]), _row([align[j] for j in keep])]
        out += [_row([r[j] for j in keep]) for r in rows] + [""]
    return out + items


@functools.lru_cache(maxsize=1)
def _parser():
    """One CommonMark parser with tables per process (building one takes ~80 ms here)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table")


def narrow_tables(markdown: str, budget: int = ROW_BUDGET) -> str:
    """The markdown with every top-level table narrowed to `budget` (fenced code and the rest untouched)."""
    lines = markdown.split("\n")
    tables = [t.map for t in _parser().parse(markdown)
              if t.type == "table_open" and t.level == 0 and t.map]
    for start, end in reversed(tables):
        narrowed = narrow_table(lines[start:end], budget)
        if narrowed != lines[start:end]:
            after = [""] if end < len(lines) and lines[end].strip() else []
            lines[start:end] = narrowed + after
    return "\n".join(lines)


def publish_markdown(key: str, markdown: str, description: str | None = None) -> UUID:
    """Create the Prefect markdown artifact `key`, its tables narrowed to fit the UI's pane."""
    from prefect.artifacts import create_markdown_artifact

    return create_markdown_artifact(key=key, markdown=narrow_tables(markdown), description=description)
