"""Evaluation stage: score one model on one benchmark, as its own cached Prefect task, and save
every score with the one comparison into the run folder.

With `execution.task_runner: ray` every (benchmark, model) pair, with `execution.shard_size`
every shard of MMLU subjects or BBH tasks, and with `execution.item_shards` every n-th-item part of
GSM8K, MATH or HumanEval (benchmarks/parts.py), is submitted at once to prefect-ray's
RayTaskRunner and runs on the Ray cluster's workers (tasks/ray_scoring.py); shards are merged back
into one result per benchmark, item for item what the sequential run gives.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy

from tasks.benchmarks.provenance import comparability, with_every_item
from tasks.benchmarks import REGISTRY, BenchmarkResult
from tasks.benchmarks.base import stderr_of_mean
from tasks.benchmarks.custom import CustomBenchmark, run_custom_benchmark
from tasks.compare import compare, item_values, paired_stderr
from tasks.config import BenchmarkConfig, JudgeConfig
from tasks.layout import RunPaths
from tasks.models import ModelRef, load_model
from tasks.caching import CODE, ContentInputs
from tasks.runtime import retry_transient
from tasks.storage import ArtifactStore

@dataclass
class BenchmarkData(CachePolicy):
    """The benchmark's items as they are now (Benchmark.data_identity): `data` names a path or
    'auto', whose files can change, or whose meaning does online and offline."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        cfg = (inputs or {}).get("cfg")
        return REGISTRY[cfg.name].data_identity(cfg) if cfg is not None else None


# The role only names the task run ("benchmark-gsm8k-base"): the same model scores the same under
# any role, so it stays out of the cache key.
BY_CONTENT_ANY_ROLE = (ContentInputs() - "role") + BenchmarkData() + CODE


@task(
    cache_policy=BY_CONTENT_ANY_ROLE,
    retries=1,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=10,
    task_run_name="benchmark-{cfg.name}-{role}",
)
def run_benchmark(model_ref: ModelRef, cfg: BenchmarkConfig, role: str = "model",
                  part: tuple[int, int] | None = None) -> BenchmarkResult:
    """Score a model on a benchmark (or part k of n of its items); cached on the model's content
    fingerprint and the settings."""
    model, tokenizer = load_model(model_ref)
    model.eval()
    return REGISTRY[cfg.name].evaluate(model, tokenizer, cfg, part)


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


def item_parts(cfg: BenchmarkConfig, n: int | None) -> list[tuple[int, int] | None]:
    """Parts (k, n) of a benchmark without subsets, at most one per item scored; [None]: whole."""
    n = min(n or 1, cfg.limit or n or 1)
    if n < 2 or REGISTRY[cfg.name].subsets:
        return [None]
    return [(k, n) for k in range(n)]


def merge_shards(parts: list[BenchmarkResult]) -> BenchmarkResult:
    """One result from the results of a benchmark's shards: records in order, micro-averaged score
    (what lm-eval's weight_by_size groups and a sequential multi-subset run report)."""
    if len(parts) == 1:
        return parts[0]
    if "part" in parts[0].settings:
        return merge_item_parts(parts)
    records, metrics, subsets = [], {}, []
    for part in parts:
        records += part.records
        names = part.settings.get("subsets") or []
        subsets += names
        # a one-subset shard reports unprefixed metrics; a multi-subset run prefixes them by subset
        metrics |= {f"{names[0]}/{k}": v for k, v in part.metrics.items()} if len(names) == 1 else part.metrics
    correct = [float(r["correct"]) for r in records]
    # split: the subsets each run scored together, which in reduced precision moves per-item results.
    settings = as_ran(parts, parts[0].settings | {"subsets": subsets, "shards": len(parts), "fewshot": merged_fewshot(parts),
                                                  "split": [len(p.settings.get("subsets") or []) for p in parts]})
    # Keyed as the same run unsharded would be (same items, settings and few-shot record); in reduced
    # precision the split is a part of the key too (tasks/benchmarks/provenance.py).
    # Every item: no shard's limit left one out (results cached before that was recorded: no limit).
    every = all(p.settings.get("left_out_by_limit", 0 if p.settings.get("limit") is None else 1) == 0 for p in parts) \
        and set(subsets) == set(REGISTRY[parts[0].name].subsets)
    provenance = with_every_item(parts[0].provenance, every)
    key, parts_of_key = comparability(parts[0].name, provenance, records, settings, parts[0].metric)
    return BenchmarkResult(
        name=parts[0].name,
        score=sum(correct) / len(correct),
        stderr=stderr_of_mean(correct),
        n=len(records),
        metric=parts[0].metric,
        settings=settings,
        metrics=metrics,
        records=records,
        seconds=sum(p.seconds for p in parts),
        provenance=provenance,
        comparability_key=key,
        comparability=parts_of_key,
        lm_eval_files={name: text for p in parts for name, text in p.lm_eval_files.items()},
    )


def merge_item_parts(parts: list[BenchmarkResult]) -> BenchmarkResult:
    """One result from parts 0..n-1 of a benchmark's items: records and per-item metric values
    back in item order, every metric recomputed over all of them as the whole run computes it."""
    from tasks.benchmarks.parts import aggregate, interleave, merge_values

    first = parts[0]
    records = interleave([p.records for p in parts])
    settings = as_ran(parts, {k: v for k, v in first.settings.items() if k != "part"} | {
        "shards": len(parts), "split": f"{len(parts)} runs, item i in run i mod {len(parts)}"})
    if any(p.item_values for p in parts):  # lm-eval: its mean and stderr over the merged items
        metrics = {k: float(v) for k, v in aggregate(merge_values([p.item_values for p in parts])).items() if v != "N/A"}
        score, stderr = metrics.get(first.metric, 0.0), metrics.get(_stderr_key(first.metric))
    else:  # HumanEval: pass@1 over the problems
        correct = [float(r["correct"]) for r in records]
        score, stderr = (sum(correct) / len(correct) if correct else 0.0), stderr_of_mean(correct)
        metrics = {first.metric: score}
    key, parts_of_key = comparability(first.name, first.provenance, records, settings, first.metric)
    return first.model_copy(update={
        "score": score, "stderr": stderr, "n": len(records), "settings": settings, "metrics": metrics,
        "records": records, "seconds": sum(p.seconds for p in parts), "comparability_key": key,
        "comparability": parts_of_key, "item_values": {},
        "lm_eval_files": _files_of_parts(parts),
    })


# How a shard computed, which can differ between the workers of one Ray cluster: machines with other
# CPUs (`precision: auto` decides per machine: bf16 on one, fp32 on another), other thread counts, a
# GPU's probe picking other scoring passes.
PER_SHARD = ("dtype", "kernels", "torch_threads", "scoring")


def as_ran(parts: list[BenchmarkResult], settings: dict) -> dict:
    """`settings` (the first shard's, merged) with each of PER_SHARD on which the shards disagree
    as the list of theirs, in shard order: the merged score's record and key never claim one way."""
    for name in PER_SHARD:
        values = [p.settings.get(name) for p in parts]
        if any(v != values[0] for v in values):
            settings[name] = values
    return settings


def _files_of_parts(parts: list[BenchmarkResult]) -> dict[str, str]:
    """lm-eval's files of every part: each its own results_<date>.json and samples (lm-eval's
    tools read them as one run per part); two parts written within the same microsecond keep both."""
    files: dict[str, str] = {}
    for i, part in enumerate(parts):
        for name, text in part.lm_eval_files.items():
            files[name if name not in files else f"part{i}_{name}"] = text
    return files


def _stderr_key(metric: str) -> str:
    name, _, filt = metric.partition(",")
    return f"{name}_stderr,{filt}"


def merged_fewshot(parts: list[BenchmarkResult]) -> dict:
    """The few-shot record per subset across shards (a one-subset shard records its entry bare)."""
    merged = {}
    for part in parts:
        names, shots = part.settings.get("subsets") or [], part.settings.get("fewshot")
        merged |= {names[0]: shots} if len(names) == 1 else (shots or {})
    return merged


def _jobs(benchmarks, custom, judge, shard_size, item_shards=None):
    """(name, task, parameters without the model and role) per job; a benchmark's shards share its name."""
    jobs = [(cfg.name, run_benchmark, {"cfg": sub} | ({"part": part} if part else {}))
            for cfg in benchmarks for sub in shards(cfg, shard_size) for part in item_parts(cfg, item_shards)]
    # Only a judge scorer gets the judge settings, so editing them never re-scores the others.
    jobs += [(f"custom/{b.name}", run_custom_benchmark,
              {"bench": b, "judge_cfg": judge if b.scorer == "judge_rubric" else None}) for b in custom]
    return jobs


def score_models(
    models: dict[str, ModelRef], benchmarks: list[BenchmarkConfig],
    custom: list[CustomBenchmark] = (), judge: JudgeConfig | None = None,
) -> dict[str, dict[str, BenchmarkResult]]:
    """Every selected benchmark, built-in then custom ('custom/<name>'), on each model (by role:
    'base', 'tuned', or 'model' for an eval run), each its own cached task, with a progress bar; one
    after another, or all at once on Ray (execution settings)."""
    from tasks.device import active
    from tasks.progress import Progress

    execution = active()
    ray = execution.task_runner == "ray"
    jobs = _jobs(benchmarks, custom, judge, *((execution.shard_size, execution.item_shards) if ray else (None, None)))
    names = list(dict.fromkeys(name for name, _, _ in jobs))
    if not jobs:  # benchmarks: [] and no custom ones: no "Benchmarks scored: 100% (done: )" line
        return {}
    bar = Progress("smolflow-benchmark-progress", "Benchmarks scored", len(models) * len(jobs))
    parts: dict[tuple[str, str], list[BenchmarkResult]] = {(n, r): [] for n in names for r in models}
    if not ray:
        for i, (name, job, params) in enumerate(jobs):
            for j, (role, model) in enumerate(models.items()):
                bar.update(i * len(models) + j, f"{name}: scoring " + ("the model" if role == "model" else f"the {role} model"))
                parts[(name, role)].append(job(model_ref=model, role=role, **params))
    else:
        from tasks.ray_scoring import score_on_ray

        score_on_ray(execution, jobs, models, parts, bar)
    scores = {name: {role: merge_shards(parts[(name, role)]) for role in models} for name in names}
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
    same = base.comparability_key == tuned.comparability_key  # then the same items: compared item by item
    c = compare(base, tuned, paired=paired_stderr(item_values(base.records), item_values(tuned.records)) if same else None)
    return {"benchmark": base.name, "metric": base.metric, "n": tuned.n, "base": c["reference"],
            "tuned": c["new"], "delta": c["delta"] if same else None, "stderr": c["stderr"], "noise": c["noise"],
            "beyond_noise": c["beyond_noise"] and same, "comparable": same,
            "source": source_note(tuned), "comparable_to_published": bool(tuned.provenance.get("comparable_to_published")),
            "comparability_key": tuned.comparability_key}


def source_note(result: BenchmarkResult) -> str:
    """Where a score's items came from, in one phrase (provenance.note, else the data setting)."""
    return str(result.provenance.get("note") or result.provenance.get("source") or result.settings.get("data") or "")


def score_row(role: str, result: BenchmarkResult) -> dict:
    """One model's score, for runs without a base/tuned pair (smolflow eval): what the summary prints."""
    return {"benchmark": result.name, "model": role, "metric": result.metric, "n": result.n,
            "score": round(result.score, 4), "stderr": None if result.stderr is None else round(result.stderr, 4),
            "source": source_note(result), "comparable_to_published": bool(result.provenance.get("comparable_to_published")),
            "comparability_key": result.comparability_key}


def scores_markdown(rows: list[dict]) -> str:
    """One row per benchmark and model, for runs without a base/tuned pair (smolflow eval)."""
    cells = lambda r: [r["benchmark"], r["model"], r["metric"], r["n"], f"{r['score']:.4f}",  # noqa: E731
                       "n/a" if r["stderr"] is None else f"{r['stderr']:.4f}", r["source"]]
    return ("| benchmark | model | metric | n | score | stderr | source |\n|---|---|---|---|---|---|---|\n"
            + "".join("| " + " | ".join(map(str, cells(r))) + " |\n" for r in rows))


def benchmarks_markdown(table: list[dict]) -> str:
    if not table:
        return "No benchmark selected.\n"
    delta = lambda r: "not comparable" if r["delta"] is None else f"{r['delta']:+}"  # noqa: E731
    noise = lambda r: ("n/a" if r["delta"] is None else  # noqa: E731
                       f"{r['beyond_noise']} (stderr {r['stderr']}, {r.get('noise', 'independent')})"
                       if r["stderr"] is not None else "unknown (under 2 items)")
    return ("| benchmark | metric | n | base | tuned | delta | beyond noise (> 2 stderr of the difference) | source |\n"
            "|---|---|---|---|---|---|---|---|\n" + "".join(
                f"| {r['benchmark']} | {r['metric']} | {r['n']} | {r['base']} | {r['tuned']} | {delta(r)} | "
                f"{noise(r)} | {r['source']} |\n" for r in table)
            + f"\nPer item and every setting: `{RunPaths.benchmarks}/<name>/{{base,tuned}}.jsonl`, `.summary.json`\n")


def save_result(run: ArtifactStore, name: str, role: str, result: BenchmarkResult) -> None:
    """One model's score of one benchmark in the run folder: per-item records, the summary, lm-eval's files."""
    run.write_text(RunPaths.benchmark_records(name, role),
                   "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in result.records))
    run.write_json(RunPaths.benchmark_summary(name, role), result.model_dump(exclude={"records"}))
    for filename, text in result.lm_eval_files.items():  # readable by lm-eval's own tooling
        run.write_text(RunPaths.benchmark_lm_eval(name, role, filename), text)


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[2, 10])
def save_scores(run_uri: str, scores: dict[str, dict[str, BenchmarkResult]]) -> list[dict]:
    """Every score's records and summary, comparison.json and the report's benchmarks section, in the
    run folder (the gate and the trend read them from there), and a Prefect table artifact; return
    the comparison rows, or each model's score where no base/tuned pair was scored (smolflow eval)."""
    run = ArtifactStore(run_uri)
    table = []
    for name, pair in scores.items():
        for role, result in pair.items():
            save_result(run, name, role, result)
        if "base" in pair and "tuned" in pair:
            table.append(comparison_row(pair["base"], pair["tuned"]))
    if table or not scores:
        run.write_json(RunPaths.comparison, table)
        run.write_text(RunPaths.section("benchmarks"), benchmarks_markdown(table))
        if table:
            create_table_artifact(key="smolflow-benchmarks", table=table, description="Base vs tuned scores")
        return table
    rows = [score_row(role, result) for pair in scores.values() for role, result in pair.items()]
    run.write_text(RunPaths.section("benchmarks"), scores_markdown(rows))
    create_table_artifact(key="smolflow-benchmarks", table=rows, description="Scores")
    return rows
