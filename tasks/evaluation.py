"""Evaluation stage: score one model on one benchmark, as its own cached Prefect task."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE, TASK_SOURCE

from tasks.benchmarks import REGISTRY, BenchmarkResult
from tasks.benchmarks.custom import CustomBenchmark, run_custom_benchmark
from tasks.compare import compare
from tasks.config import BenchmarkConfig, JudgeConfig
from tasks.layout import RunPaths
from tasks.models import ModelRef, load_model
from tasks.runtime import ContentInputs
from tasks.storage import ArtifactStore

# The role only names the task run ("benchmark-gsm8k-base"): the same model scores the same under
# any role, so it stays out of the cache key.
BY_CONTENT_ANY_ROLE = (ContentInputs() - "role") + TASK_SOURCE


@task(
    cache_policy=BY_CONTENT_ANY_ROLE,
    retries=1,
    retry_delay_seconds=10,
    task_run_name="benchmark-{cfg.name}-{role}",
)
def run_benchmark(model_ref: ModelRef, cfg: BenchmarkConfig, role: str = "model") -> BenchmarkResult:
    """Score a model on a benchmark; cached on the model's content fingerprint and the settings."""
    model, tokenizer = load_model(model_ref)
    model.eval()
    return REGISTRY[cfg.name].evaluate(model, tokenizer, cfg)


def score_models(
    models: dict[str, ModelRef], benchmarks: list[BenchmarkConfig],
    custom: list[CustomBenchmark] = (), judge: JudgeConfig | None = None,
) -> dict[str, dict[str, BenchmarkResult]]:
    """Every selected benchmark, built-in then custom ('custom/<name>'), on each model (by role:
    'base', 'tuned', or 'model' for an eval run), each its own cached task, with a progress bar."""
    from tasks.progress import Progress

    jobs = [(cfg.name, lambda m, role, cfg=cfg: run_benchmark(m, cfg, role)) for cfg in benchmarks]
    # Only a judge scorer gets the judge settings, so editing them never re-scores the others.
    jobs += [
        (f"custom/{b.name}",
         lambda m, role, b=b: run_custom_benchmark(m, b, judge if b.scorer == "judge_rubric" else None, role))
        for b in custom
    ]
    scores, bar = {}, Progress("smolflow-benchmark-progress", "Benchmarks scored", len(models) * len(jobs))
    for i, (name, score) in enumerate(jobs):
        scores[name] = {}
        for j, (role, ref) in enumerate(models.items()):
            bar.update(i * len(models) + j, f"{name}: scoring the {role} model")
            scores[name][role] = score(ref, role)
    bar.update(bar.total, f"done: {', '.join(scores)}")
    return scores


def score_base_and_tuned(
    base: ModelRef, tuned: ModelRef, benchmarks: list[BenchmarkConfig],
    custom: list[CustomBenchmark] = (), judge: JudgeConfig | None = None,
) -> dict[str, dict[str, BenchmarkResult]]:
    """score_models for a fine-tuning run: the base and the tuned model."""
    return score_models({"base": base, "tuned": tuned}, benchmarks, custom, judge)


def comparison_row(base: BenchmarkResult, tuned: BenchmarkResult) -> dict:
    """One line of comparison.json: the scores and the one comparison (tasks/compare.py)."""
    c = compare(base, tuned)
    return {"benchmark": base.name, "metric": base.metric, "n": tuned.n, "base": c["reference"],
            "tuned": c["new"], "delta": c["delta"], "stderr": c["stderr"], "beyond_noise": c["beyond_noise"]}


def scores_markdown(scores: dict[str, dict[str, BenchmarkResult]]) -> str:
    """One row per benchmark and model, for runs without a base/tuned pair (smolflow eval)."""
    rows = "".join(f"| {name} | {role} | {r.metric} | {r.n} | {r.score:.4f} | "
                   f"{'n/a' if r.stderr is None else f'{r.stderr:.4f}'} |\n"
                   for name, pair in scores.items() for role, r in pair.items())
    return "| benchmark | model | metric | n | score | stderr |\n|---|---|---|---|---|---|\n" + rows


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
    if table or not scores:
        run.write_json(RunPaths.comparison, table)
        run.write_text(RunPaths.section("benchmarks"), benchmarks_markdown(table))
    else:
        run.write_text(RunPaths.section("benchmarks"), scores_markdown(scores))
    if table:
        create_table_artifact(key="smolflow-benchmarks", table=table, description="Base vs tuned scores")
    return table
