"""Evaluation stage: score one model on one benchmark, as its own cached Prefect task."""

from __future__ import annotations

from prefect import task

from tasks.config import BenchmarkConfig, JudgeConfig
from tasks.benchmarks import REGISTRY, BenchmarkResult
from tasks.benchmarks.custom import CustomBenchmark, run_custom_benchmark
from tasks.models import ModelRef, load_model
from tasks.runtime import BY_CONTENT, retry_transient


@task(
    cache_policy=BY_CONTENT,
    retries=1, retry_condition_fn=retry_transient,
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
