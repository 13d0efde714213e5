"""Score trend over real run folders, and W&B tags read back from the offline run files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import WandbConfig
from tasks.storage import ArtifactStore, write_manifest
from tasks.tracking import start_wandb, wandb_link
from tasks.trends import collect_scores, trend_markdown, write_trend

PNG = b"\x89PNG\r\n\x1a\n"


def _run(root: str, run_id: str, scores: dict[str, float], complete: bool = True) -> str:
    run = ArtifactStore(root).child("runs", run_id)
    run.write_json("benchmarks/comparison.json", [
        {"benchmark": name, "metric": "acc", "n": 10, "base": 0.1, "tuned": score, "delta": score - 0.1,
         "beyond_noise": False}
        for name, score in scores.items()
    ])
    if complete:
        write_manifest(run.uri, {"run_id": run_id})
    return run.uri


def test_trend_plots_the_newest_completed_runs_then_the_current_one(tmp_path):
    root = str(tmp_path)
    _run(root, "20260101-000000-a", {"gsm8k": 0.10})
    _run(root, "20260102-000000-b", {"gsm8k": 0.20, "mmlu": 0.30})
    _run(root, "20260103-000000-c", {"gsm8k": 0.25})
    _run(root, "20260103-120000-crashed", {"gsm8k": 0.99}, complete=False)  # no manifest: left out
    current = _run(root, "20260104-000000-now", {"gsm8k": 0.40, "mmlu": 0.35}, complete=False)

    rows = collect_scores(root, current, n=3)
    assert [run_id for run_id, _ in rows] == ["20260102-000000-b", "20260103-000000-c", "20260104-000000-now"]
    assert rows[-1][1] == {"gsm8k": 0.40, "mmlu": 0.35}

    table, png = write_trend(root, current, n=3)
    assert png.startswith(PNG) and (Path(current) / "report/trend.png").read_bytes() == png
    lines = table.splitlines()
    assert lines[0] == "| run | gsm8k | mmlu |"
    assert lines[3] == "| 20260103-000000-c | 0.2500 (n=10) |  |"  # no mmlu score that night: a blank cell
    assert lines[-1] == "| 20260104-000000-now | 0.4000 (n=10) | 0.3500 (n=10) |"
    assert [r for r, _ in collect_scores(root)] == ["20260101-000000-a", "20260102-000000-b", "20260103-000000-c"]


def test_trend_labels_n_where_it_changes_and_keeps_its_legend_off_the_lines():
    """Two weeks of nights with nine series: an n over every point and a legend inside the axes hid
    the lines. n is labelled where a series starts or its n changes; the legend sits beside the axes."""
    from tasks.trends import Point, trend_figure

    names = ["mmlu", "gsm8k", "bbh", "math", "humaneval", "support-faq", "arc_easy", "hellaswag [ca4874ac]",
             "hellaswag [1f2e3d4c]"]
    rows = [(f"202612{d:02d}-020000-night", {name: Point(0.2 + 0.04 * ((d + i) % 15), 1319 if name == "gsm8k" and d > 8
                                                         else 100, "k")
                                             for i, name in enumerate(names) if d > 6 or not name.endswith("4c]")})
            for d in range(1, 15)]
    fig = trend_figure(rows)
    ax = fig.axes[0]
    # 9 series start (one on night 7), gsm8k's n changes once on night 9: 10 labels, not 9 x 14 - 6
    assert sorted(t.get_text() for t in ax.texts) == ["n=100"] * 9 + ["n=1319"], [t.get_text() for t in ax.texts]
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1, f"the legend {legend} overlaps the axes {axes}"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == sorted(names)


def test_trend_with_no_scores_still_draws_and_says_so(tmp_path):
    run = ArtifactStore(str(tmp_path)).child("runs", "only")
    run.write_json("config.json", {})
    table, png = write_trend(str(tmp_path), run.uri)
    assert png.startswith(PNG) and "No earlier runs" in table
    with pytest.raises(ValueError, match="n=0"):
        collect_scores(str(tmp_path), n=0)
    assert trend_markdown([]) == "No earlier runs with benchmark scores.\n"
    # runs without benchmarks (`--benchmarks '[]'`): no line to label, and no matplotlib warning on the console
    import warnings

    _run(str(tmp_path), "20260101-000000-a", {})
    current = _run(str(tmp_path), "20260102-000000-b", {}, complete=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert write_trend(str(tmp_path), current)[1].startswith(PNG)


def _records(run_dir: Path) -> list[dict]:
    """Every record of the offline run's .wandb log, read with W&B's own reader."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(offline)],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_wandb_run_is_tagged_with_its_deployment(tmp_path):
    wb = start_wandb(WandbConfig(mode="offline"), "r1", {"x": 1}, tmp_path, "nightly-group", ["nightly-deployment"])
    assert wandb_link(wb, str(tmp_path / "runs/r1")).startswith(str(tmp_path / "runs/r1/wandb/offline-run-"))
    wb.finish()

    run_record = next(r for r in _records(tmp_path) if r["type"] == "run")
    assert "nightly-deployment" in run_record["run"]["tags"]


def test_the_prefect_link_carries_no_password_of_the_api_url():
    """Prefect derives its UI's address from PREFECT_API_URL, user:password@ included; the link goes
    into the report, the Prefect artifacts and W&B's config and notes."""
    from prefect import flow
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    from tasks.runtime import flow_run_link

    @flow
    def linked() -> str | None:
        return flow_run_link()

    with temporary_settings(updates={PREFECT_UI_URL: "http://audit:SECRET-pw-1234@127.0.0.1:4280"}):
        link = linked()
    assert link.startswith("http://127.0.0.1:4280/flow-runs/flow-run/") and "SECRET" not in link
