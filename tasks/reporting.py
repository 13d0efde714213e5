"""Reporting stage: write samples, scores and a readable report into the run folder, and show
them in the Prefect UI as artifacts."""

from __future__ import annotations

import json
import math

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from tasks.benchmarks import BenchmarkResult
from tasks.generation import Sample
from tasks.storage import ArtifactStore
from tasks.training import TrainResult


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


@task(cache_policy=INPUTS + TASK_SOURCE, retries=3, retry_delay_seconds=[2, 10, 30])
def write_report(
    run_uri: str,
    template: str,
    before: list[Sample],
    after: list[Sample],
    trained: TrainResult,
    scores: dict[str, dict[str, BenchmarkResult]],
    wandb_url: str | None,
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

    table = []
    for name, pair in scores.items():
        for label, result in pair.items():
            store.write_text(f"benchmarks/{name}/{label}.jsonl", _jsonl(result.records))
            store.write_json(f"benchmarks/{name}/{label}.summary.json", result.model_dump(exclude={"records"}))
        table.append(compare(pair["base"], pair["tuned"]))
    store.write_json("benchmarks/comparison.json", table)

    m = trained.metrics
    bench_md = "| benchmark | metric | n | base | tuned | delta | beyond noise |\n|---|---|---|---|---|---|---|\n" + "".join(
        f"| {r['benchmark']} | {r['metric']} | {r['n']} | {r['base']} | {r['tuned']} | {r['delta']:+} | {r['beyond_noise']} |\n"
        for r in table
    )
    report = (
        f"# smolflow run `{run_uri.rsplit('/', 1)[-1]}`\n\n"
        f"Artifacts: `{run_uri}`" + (f" · W&B: {wandb_url}" if wandb_url else "") + "\n\n"
        f"## Training\n\nsteps {m['steps']:.0f} · train loss {m['train_loss']:.4f} · "
        f"eval loss {m['eval_loss']:.4f} (perplexity {m['eval_perplexity']:.2f}) · "
        f"{m['train_runtime_s']:.0f} s\n\nTuned model: `{trained.model.path}`\n\n"
        f"## Benchmarks (base vs tuned)\n\n{bench_md}\n"
        f"## Samples (greedy)\n\n{samples_md}"
    )
    store.write_text("report/report.md", report)
    create_markdown_artifact(key="smolflow-report", markdown=report, description="smolflow run report")
    if table:
        create_table_artifact(key="smolflow-benchmarks", table=table, description="Base vs tuned scores")
    return {"run": run_uri, "model": trained.model.path, "training": m, "benchmarks": table}
