"""Evaluation stage: score one model on one benchmark, as its own cached Prefect task."""

from __future__ import annotations

from prefect import task

from flows.config import BenchmarkConfig
from tasks.benchmarks import REGISTRY, BenchmarkResult
from tasks.models import ModelRef, load_model
from tasks.runtime import BY_CONTENT


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
    base: ModelRef, tuned: ModelRef, benchmarks: list[BenchmarkConfig]
) -> dict[str, dict[str, BenchmarkResult]]:
    """Every selected benchmark on both models (each its own cached task), with a progress bar."""
    from tasks.progress import Progress

    scores, bar = {}, Progress("smolflow-benchmark-progress", "Benchmarks scored", 2 * len(benchmarks))
    for i, cfg in enumerate(benchmarks):
        bar.update(2 * i, f"{cfg.name}: scoring the base model")
        base_score = run_benchmark(base, cfg)
        bar.update(2 * i + 1, f"{cfg.name}: scoring the tuned model")
        scores[cfg.name] = {"base": base_score, "tuned": run_benchmark(tuned, cfg)}
    bar.update(bar.total, f"done: {', '.join(scores)}")
    return scores
