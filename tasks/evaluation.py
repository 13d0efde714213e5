"""Evaluation stage: score one model on one benchmark, as its own cached Prefect task."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.benchmarks import REGISTRY, BenchmarkResult
from tasks.benchmarks.custom import CustomBenchmark, run_custom_benchmark
from tasks.compare import compare
from tasks.config import BenchmarkConfig, JudgeConfig
from tasks.layout import RunPaths
from tasks.models import ModelRef, load_model
from tasks.runtime import BY_CONTENT
from tasks.storage import ArtifactStore


@task(
    cache_policy=BY_CONTENT,
    retries=1,
    retry_delay_seconds=10,
    task_run_name="benchmark-{cfg.name}",
)
def run_benchmark(model_ref: ModelRef, cfg: BenchmarkConfig) -> BenchmarkResult:
    """Score a model on a benchmark; cached on the model's content fingerprint and the settings."""
    model, tokenizer = load_model(model_ref)
    model.eval()
    return REGISTRY[cfg.name].evaluate(model, tokenizer, cfg)


def score_base_and_tuned(
    base: ModelRef, tuned: ModelRef, benchmarks: list[BenchmarkConfig],
    custom: list[CustomBenchmark] = (), judge: JudgeConfig | None = None,
) -> dict[str, dict[str, BenchmarkResult]]:
    """Every selected benchmark, built-in then custom ('custom/<name>'), on both models, each its own
    cached task, with a progress bar."""
    from tasks.progress import Progress

    jobs = [(cfg.name, lambda m, cfg=cfg: run_benchmark(m, cfg)) for cfg in benchmarks]
    # Only a judge scorer gets the judge settings, so editing them never re-scores the others.
    jobs += [
        (f"custom/{b.name}", lambda m, b=b: run_custom_benchmark(m, b, judge if b.scorer == "judge_rubric" else None))
        for b in custom
    ]
    scores, bar = {}, Progress("smolflow-benchmark-progress", "Benchmarks scored", 2 * len(jobs))
    for i, (name, score) in enumerate(jobs):
        bar.update(2 * i, f"{name}: scoring the base model")
        base_score = score(base)
        bar.update(2 * i + 1, f"{name}: scoring the tuned model")
        scores[name] = {"base": base_score, "tuned": score(tuned)}
    bar.update(bar.total, f"done: {', '.join(scores)}")
    return scores


def comparison_row(base: BenchmarkResult, tuned: BenchmarkResult) -> dict:
    """One line of comparison.json: the scores and the one comparison (tasks/compare.py)."""
    c = compare(base, tuned)
    return {"benchmark": base.name, "metric": base.metric, "n": tuned.n, "base": c["reference"],
            "tuned": c["new"], "delta": c["delta"], "stderr": c["stderr"], "beyond_noise": c["beyond_noise"]}


def benchmarks_markdown(table: list[dict]) -> str:
    if not table:
        return "No benchmark selected.\n"
    return ("| benchmark | metric | n | base | tuned | delta | beyond noise (> 2 combined stderr) |\n"
            "|---|---|---|---|---|---|---|\n" + "".join(
                f"| {r['benchmark']} | {r['metric']} | {r['n']} | {r['base']} | {r['tuned']} | {r['delta']:+} | "
                f"{r['beyond_noise']} |\n" for r in table)
            + f"\nPer item and every setting: `{RunPaths.benchmarks}/<name>/{{base,tuned}}.jsonl`, `.summary.json`\n")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def save_scores(run_uri: str, scores: dict[str, dict[str, BenchmarkResult]]) -> list[dict]:
    """Every score's records and summary, comparison.json and the report's benchmarks section, in the
    run folder (the gate and the trend read them from there), and a Prefect table artifact."""
    run = ArtifactStore(run_uri)
    table = []
    for name, pair in scores.items():
        for role, result in pair.items():
            run.write_text(RunPaths.benchmark_records(name, role),
                           "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in result.records))
            run.write_json(RunPaths.benchmark_summary(name, role), result.model_dump(exclude={"records"}))
        if "base" in pair and "tuned" in pair:
            table.append(comparison_row(pair["base"], pair["tuned"]))
    run.write_json(RunPaths.comparison, table)
    run.write_text(RunPaths.section("benchmarks"), benchmarks_markdown(table))
    if table:
        create_table_artifact(key="smolflow-benchmarks", table=table, description="Base vs tuned scores")
    return table
