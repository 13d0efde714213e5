"""Score trend: the tuned model's score per benchmark over the last N runs in the artifact store,
read from each completed run's benchmarks/comparison.json (the current run joins them last).

One series per comparability key (tasks/benchmarks/provenance.py): a score on 2 items and one on
10, or 0-shot and 5-shot, are different series, never one line. Each point shows its n.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from tasks.layout import RunPaths, run_dir
from tasks.runtime import figure_png
from tasks.storage import ArtifactStore, completed_runs

DEFAULT_RUNS = 10


class Point(NamedTuple):
    score: float
    n: int | None
    key: str | None  # comparability key; None for runs scored before keys were recorded
    parts: dict | None = None  # what the key hashes (read where a benchmark has several keys, to name them)


# Parts of a comparability key a label can say in words; the rest are hashes (data, items, scorer, ...).
SAID = {"n": lambda v: f"n={v}", "num_fewshot": lambda v: f"{v}-shot", "format": str,
        "chat_template": lambda v: "chat template" if v else "no chat template",
        "precision": lambda v: {"bfloat16": "bf16", "float32": "fp32"}.get(v, str(v))}


def _point(run: ArtifactStore, row: dict) -> Point:
    key, n = row.get("comparability_key"), row.get("n")
    summary = RunPaths.benchmark_summary(row["benchmark"], "tuned")
    if key is None and run.exists(summary):  # the key lives with the score itself
        saved = run.read_json(summary)
        key, n = saved.get("comparability_key"), saved.get("n", n)
    return Point(row["tuned"], n, key)


def collect_points(root: str, current_uri: str | None = None, n: int = DEFAULT_RUNS) -> list[tuple[str, dict[str, Point]]]:
    """[(run id, {benchmark: Point})] for the newest n runs by run id, oldest first.

    Run ids start with a UTC timestamp, so their order is the runs' order. The current run has no
    manifest yet (it is written last), so it is added explicitly when current_uri is given.
    """
    if n < 1:
        raise ValueError(f"n={n}: the trend needs at least one run")
    store = ArtifactStore(root)
    current = current_uri.rstrip("/").rsplit("/", 1)[-1] if current_uri else None
    ids = sorted(set(completed_runs(root)) - {current})
    picked = [(i, store.child(run_dir(i))) for i in ids]
    if current_uri:
        picked.append((current, ArtifactStore(current_uri)))
    rows, runs = [], {}
    for run_id, run in picked[-n:]:
        if not run.exists(RunPaths.comparison):  # a run without benchmarks has no point to plot
            continue
        rows.append((run_id, {r["benchmark"]: _point(run, r) for r in run.read_json(RunPaths.comparison)}))
        runs[run_id] = run
    # Where a benchmark has several series, what each key stands for names it (`mmlu [format mcq]`)
    keys: dict[str, set] = {}
    for _, points in rows:
        for name, p in points.items():
            keys.setdefault(name, set()).add(p.key)
    for run_id, points in rows:
        for name, p in points.items():
            summary = RunPaths.benchmark_summary(name, "tuned")
            if len(keys[name]) > 1 and runs[run_id].exists(summary):
                points[name] = p._replace(parts=runs[run_id].read_json(summary).get("comparability"))
    return rows


def series_labels(name: str, parts: dict[str | None, dict | None]) -> dict[str | None, str]:
    """{key: `name [what sets this series apart]`}: the differing parts said in words where they can
    be (n=10, 5-shot, mcq, bf16), else named with the key's first 8 characters; never two alike."""
    known = [p for p in parts.values() if p]
    differ = [f for f in dict.fromkeys(f for p in known for f in p) if len({repr(p.get(f)) for p in known}) > 1]
    labels = {}
    for key, p in parts.items():
        said = [SAID[f](p.get(f)) for f in differ if f in SAID] if p else []
        labels[key] = ", ".join(said) or ", ".join([f for f in differ if f not in SAID] + [(key or "no key")[:8]])
    said = Counter(labels.values())  # where the words alone do not tell two apart, their keys do
    labels = {key: f"{label}, {(key or 'no key')[:8]}" if said[label] > 1 else label for key, label in labels.items()}
    return {key: f"{name} [{label}]" for key, label in labels.items()}


def series(rows: list[tuple[str, dict[str, Point]]]) -> list[tuple[str, dict[str, Point]]]:
    """Rows keyed by series: the benchmark's name while it has one comparability key, else
    `name [what differs]` per key, so scores that cannot be compared never share a line."""
    parts: dict[str, dict] = {}
    for _, points in rows:
        for name, p in points.items():
            parts.setdefault(name, {}).setdefault(p.key, p.parts)
    labels = {name: {next(iter(by_key)): name} if len(by_key) == 1 else series_labels(name, by_key)
              for name, by_key in parts.items()}
    return [(run_id, {labels[name][p.key]: p for name, p in points.items()}) for run_id, points in rows]


def collect_scores(root: str, current_uri: str | None = None, n: int = DEFAULT_RUNS) -> list[tuple[str, dict[str, float]]]:
    """[(run id, {series: tuned score})]: collect_points, one series per comparability key."""
    return [(run_id, {s: p.score for s, p in points.items()}) for run_id, points in series(collect_points(root, current_uri, n))]


def trend_markdown(rows: list[tuple[str, dict]]) -> str:
    """Runs down, series across, each cell a score and its n; blank where a run has no such score."""
    names = sorted({b for _, scores in rows for b in scores})
    if not rows or not names:
        return "No earlier runs with benchmark scores.\n"

    def cell(value) -> str:
        if isinstance(value, Point):
            return f"{value.score:.4f}" + (f" (n={value.n})" if value.n is not None else "")
        return f"{value:.4f}"

    head = "| run | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    return head + "".join(
        f"| {run_id} | " + " | ".join(cell(scores[b]) if b in scores else "" for b in names) + " |\n"
        for run_id, scores in rows
    )


def plot_trend(rows: list[tuple[str, dict]]) -> bytes:
    """Tuned score per series against the run, as a PNG."""
    return figure_png(trend_figure(rows))


def trend_figure(rows: list[tuple[str, dict]]):
    """The trend's matplotlib figure; a series' n labelled where it starts or changes.

    Every point labelled and the legend inside the axes hid the lines after two weeks of nights."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in sorted({b for _, scores in rows for b in scores}):
        pts = [(i, scores[name]) for i, (_, scores) in enumerate(rows) if name in scores]
        xs, values = zip(*pts)
        ys = [v.score if isinstance(v, Point) else v for v in values]
        ax.plot(xs, ys, "o-", label=name)
        shown = None
        for x, y, v in zip(xs, ys, values):
            if isinstance(v, Point) and v.n is not None and v.n != shown:
                ax.annotate(f"n={v.n}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
                shown = v.n
    ax.set_xticks(range(len(rows)), [run_id for run_id, _ in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("tuned score")
    ax.set_ylim(-0.02, 1.02)  # the whole score range: one run must not zoom a 0.3 into a cliff
    ax.set_title(f"Tuned scores, last {len(rows)} run(s); one line per comparable setting")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # runs without benchmarks have no line: matplotlib warned on the console
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the lines, not over them
    return fig


def write_trend(root: str, run_uri: str, n: int = DEFAULT_RUNS) -> tuple[str, bytes]:
    """Write report/trend.png into the run folder; return the trend's markdown table and the PNG."""
    rows = series(collect_points(root, run_uri, n))
    png = plot_trend(rows)
    ArtifactStore(run_uri).write_bytes(RunPaths.trend, png)
    return trend_markdown(rows), png
