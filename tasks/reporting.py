"""Reporting stage: write samples, scores and a readable report into the run folder, and show
them in the Prefect UI as artifacts."""

from __future__ import annotations

import base64
import json
import math

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from tasks.benchmarks import BenchmarkResult
from tasks.data import DatasetRef
from tasks.gate import GateDecision
from tasks.gate import markdown as gate_markdown
from tasks.generation import Sample
from tasks.health import HealthReport, curves_table, plot_curves
from tasks.judge import JudgeResult
from tasks.tokenization import TokenStats
from tasks.storage import ArtifactStore
from tasks.training import TrainResult
from tasks.trends import DEFAULT_RUNS, write_trend


def compare(base: BenchmarkResult, tuned: BenchmarkResult) -> dict:
    """Score change, and whether it exceeds twice the combined standard error."""
    delta = tuned.score - base.score
    noise = math.sqrt((base.stderr or 0) ** 2 + (tuned.stderr or 0) ** 2)
    return {
        "benchmark": base.name,
        "metric": base.metric,
        "n": tuned.n,
        "base": round(base.score, 4),
        "tuned": round(tuned.score, 4),
        "delta": round(delta, 4),
        "beyond_noise": bool(noise and abs(delta) > 2 * noise),
    }


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def config_markdown(config: dict | None) -> str:
    """The RunConfig as a YAML block (it holds no secrets by design: keys come from the environment)."""
    if not config:
        return "Not recorded.\n"
    import yaml

    return f"```yaml\n{yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)}```\n"


def data_markdown(data: DatasetRef | None) -> str:
    if data is None:
        return "Not recorded.\n"
    rows = " · ".join(f"{split}: {n} rows" for split, n in data.rows.items())
    dropped = "".join(
        f"\nDropped from {split}: " + ", ".join(f"{n} × {reason}" for reason, n in counts.items()) + "\n"
        for split, counts in data.dropped.items() if counts
    )
    return f"Source `{data.source}` · {rows} · fingerprint `{data.fingerprint}`\n{dropped}"


def tokens_markdown(stats: TokenStats | None) -> str:
    """Token lengths per split, and where the template preview and the histogram are."""
    if stats is None:
        return ""
    rows = stats.table()
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n" if rows else ""
    body = "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in rows)
    return (f"\nTokens per conversation (chat template applied, before truncation to max_length={stats.max_length}):"
            f"\n\n{head}{body}\nHistogram: `data/token_lengths.png` · how the chat templates render a conversation, "
            "with token ids: `data/template_preview.md`\n")


def judge_markdown(judge: JudgeResult | None) -> str:
    """Win rate with its counts and settings, and a few pairs; the rest is in judge/pairs.jsonl."""
    if judge is None:
        return "Not run (judge.enabled: false).\n"
    s = judge.settings
    rate = "n/a (no pair judged in both orders)" if judge.win_rate is None else (
        f"**{judge.win_rate:.1f}%**" + (f" ± {judge.stderr:.1f}" if judge.stderr is not None
                                         else f" ± n/a ({getattr(judge, 'stderr_note', None) or 'too few pairs'})"))
    head = (
        f"Win rate of the tuned model against {s.get('reference')!r}: {rate} (AlpacaEval's definition: ties count "
        f"half) · n={judge.n} of {judge.pairs} pairs · {judge.wins} win / {judge.ties} tie / {judge.losses} loss · "
        f"{judge.parse_failures} unparseable verdict(s) · judge `{s.get('judge_identity')}` · both orders judged per pair · "
        f"length-controlled: {'n/a' if judge.lc_win_rate is None else f'{judge.lc_win_rate:.1f}%'}\n\n"
    )
    rows = "".join(
        f"| {_cell(r['instruction'][:120])} | {_cell((r['output'] or '')[:160])} | "
        f"{_cell((r['reference_output'] or '')[:160])} | {r['preference']} |\n"
        for r in judge.records[:5]
    )
    if getattr(judge, "note", None):
        head = f"**Note: {judge.note}.**\n\n" + head
    return head + "| instruction | tuned | reference | preference (2 = tuned better, 1.5 = tie) |\n|---|---|---|---|\n" + rows


def links_markdown(store: ArtifactStore, wandb_link: str | None) -> str:
    """Where to find the run's pieces: run-folder URIs, and the W&B run (URL online, files offline)."""
    links = [("run folder", store.uri), ("tuned model", store.url("model/")),
             ("benchmark results", store.url("benchmarks/")), ("loss curves", store.url("training/curves.png")),
             ("score trend", store.url("report/trend.png")), ("gate decision", store.url("gate/decision.md")),
             ("judge pairs", store.url("judge/pairs.jsonl"))]
    if wandb_link:
        links.append(("W&B run", wandb_link))
    return "".join(f"- {label}: {uri}\n" if uri.startswith("http") else f"- {label}: `{uri}`\n" for label, uri in links)


@task(cache_policy=INPUTS + TASK_SOURCE, retries=3, retry_delay_seconds=[2, 10, 30])
def write_report(
    run_uri: str,
    template: str,
    before: list[Sample],
    after: list[Sample],
    trained: TrainResult,
    scores: dict[str, dict[str, BenchmarkResult]],
    wandb_link: str | None,
    health: HealthReport | None = None,
    config: dict | None = None,
    data: DatasetRef | None = None,
    decision: GateDecision | None = None,
    root: str | None = None,
    trend_runs: int = DEFAULT_RUNS,
    gate_enabled: bool = True,
    judge: JudgeResult | None = None,
    token_stats: TokenStats | None = None,
) -> dict:
    """Write samples, training metrics, benchmark results and report.md; publish Prefect artifacts."""
    store = ArtifactStore(run_uri)
    store.write_text("template/rendered_example.txt", template)
    pairs = [
        {"prompt": b.prompt, "before": b.completion, "after": a.completion,
         "before_stopped_at_eos": b.stopped_at_eos, "after_stopped_at_eos": a.stopped_at_eos}
        for b, a in zip(before, after)
    ]
    store.write_text("samples/samples.jsonl", _jsonl(pairs))
    samples_md = "| prompt | before training | after training |\n|---|---|---|\n" + "".join(
        f"| {_cell(p['prompt'])} | {_cell(p['before'])} | {_cell(p['after'])} |\n" for p in pairs
    )
    store.write_text("samples/side_by_side.md", samples_md)
    store.write_json("training/metrics.json", trained.metrics)
    store.write_json("training/log_history.json", trained.log_history)
    curves_png = plot_curves(trained.log_history)  # train/eval loss and LR, for readers without W&B
    store.write_bytes("training/curves.png", curves_png)
    health_md = health.markdown() if health else "Not assessed."
    if health:
        store.write_json("training/health.json", health.model_dump())
        store.write_text("training/health.md", health_md)

    table = []
    for name, pair in scores.items():
        for label, result in pair.items():
            store.write_text(f"benchmarks/{name}/{label}.jsonl", _jsonl(result.records))
            store.write_json(f"benchmarks/{name}/{label}.summary.json", result.model_dump(exclude={"records"}))
        table.append(compare(pair["base"], pair["tuned"]))
    store.write_json("benchmarks/comparison.json", table)

    trend_md, trend_png = ("Not plotted (no artifact root given).\n", None)
    if root:
        trend_md, trend_png = write_trend(root, run_uri, trend_runs)
    m = trained.metrics
    bench_md = "| benchmark | metric | n | base | tuned | delta | beyond noise |\n|---|---|---|---|---|---|---|\n" + "".join(
        f"| {r['benchmark']} | {r['metric']} | {r['n']} | {r['base']} | {r['tuned']} | {r['delta']:+} | {r['beyond_noise']} |\n"
        for r in table
    )
    report = (
        f"# smolflow run `{run_uri.rsplit('/', 1)[-1]}`\n\n"
        f"## Links\n\n{links_markdown(store, wandb_link)}\n"
        f"## Configuration\n\n{config_markdown(config)}\n"
        f"## Data\n\n{data_markdown(data)}\n{tokens_markdown(token_stats)}"
        f"## Training\n\nsteps {m['steps']:.0f} · train loss {m['train_loss']:.4f} · "
        f"eval loss {m['eval_loss']:.4f} (perplexity {m['eval_perplexity']:.2f}) · "
        f"{m['train_runtime_s']:.0f} s\n\nTuned model: `{trained.model.path}` · curves: `training/curves.png`\n\n"
        f"## Training health\n\n{health_md}\n"
        f"## Benchmarks (base vs tuned)\n\n{bench_md}\n"
        f"## Judge (tuned vs reference)\n\n{judge_markdown(judge)}\n"
        f"## Score trend (tuned, last {trend_runs} runs)\n\n![trend](trend.png)\n\n{trend_md}\n"
        + (gate_markdown(decision).replace("# Regression gate", "## Regression gate", 1) + "\n" if decision else "")
        + ("" if gate_enabled else "The gate is off (gate.enabled: false): not promoted whatever the verdict.\n\n") +
        f"## Samples (greedy)\n\n{samples_md}"
    )
    store.write_text("report/report.md", report)
    # The relative image resolves next to report.md only; the UI shows the trend in its own artifact.
    create_markdown_artifact(key="smolflow-report", markdown=report.replace("![trend](trend.png)\n\n", ""),
                             description="smolflow run report")
    if health:
        create_markdown_artifact(key="smolflow-training-health", markdown=health_md, description="Training warning signs")
    # Prefect's image artifact needs a URL a browser can fetch; a run folder may be local or
    # private S3, so the PNG travels inline, with the numbers as a table below it.
    png = base64.b64encode(curves_png).decode()
    create_markdown_artifact(key="smolflow-training-curves", description="Loss and learning-rate curves",
                             markdown=f"![curves](data:image/png;base64,{png})\n\n{curves_table(trained.log_history)}")
    if trend_png:
        png = base64.b64encode(trend_png).decode()
        create_markdown_artifact(key="smolflow-score-trend", description="Tuned scores over the last runs",
                                 markdown=f"![trend](data:image/png;base64,{png})\n\n{trend_md}")
    if table:
        create_table_artifact(key="smolflow-benchmarks", table=table, description="Base vs tuned scores")
    judged = judge and {k: getattr(judge, k) for k in ("win_rate", "stderr", "n", "wins", "ties", "losses", "parse_failures")}
    return {"run": run_uri, "model": trained.model.path, "training": m, "benchmarks": table, "judge": judged}
