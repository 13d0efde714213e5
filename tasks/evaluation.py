"""Evaluation stage: score one model on one benchmark, as its own cached Prefect task.

With `execution.task_runner: ray` every (benchmark, model) pair, and with `execution.shard_size`
every shard of MMLU subjects or BBH tasks, is submitted at once to prefect-ray's RayTaskRunner and
runs on the Ray cluster's workers; shards are merged back into one result per benchmark, item for
item what the sequential run gives.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prefect import task

from tasks.config import BenchmarkConfig, ExecutionConfig, JudgeConfig
from tasks.benchmarks import REGISTRY, BenchmarkResult
from tasks.benchmarks.base import stderr_of_mean
from tasks.benchmarks.custom import CustomBenchmark, run_custom_benchmark
from tasks.models import ModelRef, load_model
from tasks.runtime import BY_CONTENT, run_logger

# What a Ray worker needs of this process's environment to load the same models the same way and
# report to the same Prefect server (without PREFECT_API_URL each worker starts a server of its own).
_FORWARD = ("SMOLFLOW_EXECUTION", "SMOLFLOW_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME",
            "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "TOKENIZERS_PARALLELISM", "WANDB_MODE")


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


def subset_names(cfg: BenchmarkConfig) -> list[str]:
    """The MMLU subjects / BBH tasks `cfg` scores, in the order a sequential run scores them."""
    bench = REGISTRY[cfg.name]
    with tempfile.TemporaryDirectory() as workdir:
        specs = bench.task_configs(cfg, Path(workdir))
    return [s["task"].removeprefix(f"smolflow_{cfg.name}_") for s in specs]


def shards(cfg: BenchmarkConfig, size: int | None) -> list[BenchmarkConfig]:
    """`cfg` split into configs of at most `size` subsets each (one config if unsplittable)."""
    if not size or not REGISTRY[cfg.name].subsets:
        return [cfg]
    names = subset_names(cfg)
    if len(names) <= size:
        return [cfg]
    return [cfg.model_copy(update={"subsets": names[i : i + size]}) for i in range(0, len(names), size)]


def merge_shards(parts: list[BenchmarkResult]) -> BenchmarkResult:
    """One result from the results of a benchmark's shards: records in order, micro-averaged score
    (what lm-eval's weight_by_size groups and a sequential multi-subset run report)."""
    if len(parts) == 1:
        return parts[0]
    records, metrics, subsets = [], {}, []
    for part in parts:
        records += part.records
        names = part.settings.get("subsets") or []
        subsets += names
        # a one-subset shard reports unprefixed metrics; a multi-subset run prefixes them by subset
        metrics |= {f"{names[0]}/{k}": v for k, v in part.metrics.items()} if len(names) == 1 else part.metrics
    correct = [float(r["correct"]) for r in records]
    return BenchmarkResult(
        name=parts[0].name,
        score=sum(correct) / len(correct),
        stderr=stderr_of_mean(correct),
        n=len(records),
        metric=parts[0].metric,
        settings=parts[0].settings | {"subsets": subsets, "shards": len(parts)},
        metrics=metrics,
        records=records,
        seconds=sum(p.seconds for p in parts),
    )


def ray_runner(execution: ExecutionConfig):
    """prefect-ray's RayTaskRunner: joins `ray_address`, or starts a local cluster for the scoring
    (stopped after it), with this process's settings forwarded to its workers."""
    from prefect.settings import get_current_settings
    from prefect_ray import RayTaskRunner

    env = {k: os.environ[k] for k in _FORWARD if k in os.environ}
    api = get_current_settings().api.url
    if api:
        env["PREFECT_API_URL"] = str(api)
    init = {"include_dashboard": False, "runtime_env": {"env_vars": env}}
    if execution.ray_num_cpus and not execution.ray_address:
        init["num_cpus"] = execution.ray_num_cpus
    return RayTaskRunner(address=execution.ray_address, init_kwargs=init)


def _jobs(benchmarks, custom, judge, shard_size):
    """(name, task, parameters without the model) per job; a benchmark's shards share its name."""
    jobs = [(cfg.name, run_benchmark, {"cfg": part}) for cfg in benchmarks for part in shards(cfg, shard_size)]
    # Only a judge scorer gets the judge settings, so editing them never re-scores the others.
    jobs += [(f"custom/{b.name}", run_custom_benchmark,
              {"bench": b, "judge_cfg": judge if b.scorer == "judge_rubric" else None}) for b in custom]
    return jobs


def score_base_and_tuned(
    base: ModelRef, tuned: ModelRef, benchmarks: list[BenchmarkConfig],
    custom: list[CustomBenchmark] = (), judge: JudgeConfig | None = None,
) -> dict[str, dict[str, BenchmarkResult]]:
    """Every selected benchmark, built-in then custom ('custom/<name>'), on both models, each its own
    cached task, with a progress bar; one after another, or all at once on Ray (execution settings)."""
    from tasks.device import active
    from tasks.progress import Progress

    execution = active()
    ray = execution.task_runner == "ray"
    jobs = _jobs(benchmarks, custom, judge, execution.shard_size if ray else None)
    names = list(dict.fromkeys(name for name, _, _ in jobs))
    bar = Progress("smolflow-benchmark-progress", "Benchmarks scored", 2 * len(jobs))
    parts: dict[tuple[str, str], list[BenchmarkResult]] = {(n, w): [] for n in names for w in ("base", "tuned")}
    if not ray:
        for i, (name, job, params) in enumerate(jobs):
            for j, (which, model) in enumerate((("base", base), ("tuned", tuned))):
                bar.update(2 * i + j, f"{name}: scoring the {which} model")
                parts[(name, which)].append(job(model_ref=model, **params))
    else:
        _score_on_ray(execution, jobs, base, tuned, parts, bar)
    scores = {name: {which: merge_shards(parts[(name, which)]) for which in ("base", "tuned")} for name in names}
    bar.update(bar.total, f"done: {', '.join(scores)}")
    return scores


def _score_on_ray(execution, jobs, base, tuned, parts, bar) -> None:
    """Submit every job for both models at once; collect the results in submission order."""
    import ray
    from prefect_ray.context import remote_options

    with ray_runner(execution) as runner:
        # One GPU per task where the cluster has GPUs; else Ray's default share of one CPU.
        gpus = ray.cluster_resources().get("GPU", 0)
        run_logger().info("Scoring %d benchmark tasks on Ray (%s)", 2 * len(jobs), ray.cluster_resources())
        with remote_options(**({"num_gpus": 1} if gpus else {"num_cpus": 1})):
            futures = [((name, which), runner.submit(job, {"model_ref": model, **params}))
                       for name, job, params in jobs for which, model in (("base", base), ("tuned", tuned))]
        for done, (key, future) in enumerate(futures):
            parts[key].append(future.result())
            bar.update(done + 1, f"{key[0]}: {key[1]} model scored")
