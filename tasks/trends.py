"""Score trend: the tuned model's score per benchmark over the last N runs in the artifact store,
read from each completed run's benchmarks/comparison.json (the current run joins them last)."""

from __future__ import annotations


from tasks.layout import RunPaths, run_dir
from tasks.runtime import figure_png
from tasks.storage import ArtifactStore, completed_runs

DEFAULT_RUNS = 10


def collect_scores(
    root: str, current_uri: str | None = None, n: int = DEFAULT_RUNS
) -> list[tuple[str, dict[str, float]]]:
    """[(run id, {benchmark: tuned score})] for the newest n runs by run id, oldest first.

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
    rows = []
    for run_id, run in picked[-n:]:
        if not run.exists(RunPaths.comparison):  # a run without benchmarks has no point to plot
            continue
        rows.append((run_id, {r["benchmark"]: r["tuned"] for r in run.read_json(RunPaths.comparison)}))
    return rows


def trend_markdown(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Runs down, benchmarks across; a blank cell where a run did not score that benchmark."""
    names = sorted({b for _, scores in rows for b in scores})
    if not rows or not names:
        return "No earlier runs with benchmark scores.\n"
    head = "| run | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    return head + "".join(
        f"| {run_id} | " + " | ".join(f"{scores[b]:.4f}" if b in scores else "" for b in names) + " |\n"
        for run_id, scores in rows
    )


def plot_trend(rows: list[tuple[str, dict[str, float]]]) -> bytes:
    """Tuned score per benchmark against the run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in sorted({b for _, scores in rows for b in scores}):
        pts = [(i, scores[name]) for i, (_, scores) in enumerate(rows) if name in scores]
        ax.plot(*zip(*pts), "o-", label=name)
    ax.set_xticks(range(len(rows)), [run_id for run_id, _ in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("tuned score")
    ax.set_title(f"Tuned scores, last {len(rows)} run(s)")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend()
    return figure_png(fig)


def write_trend(root: str, run_uri: str, n: int = DEFAULT_RUNS) -> tuple[str, bytes]:
    """Write report/trend.png into the run folder; return the trend's markdown table and the PNG."""
    rows = collect_scores(root, run_uri, n)
    png = plot_trend(rows)
    ArtifactStore(run_uri).write_bytes(RunPaths.trend, png)
    return trend_markdown(rows), png
