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
