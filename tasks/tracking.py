"""Weights & Biases: one run per flow run, offline files by default, online when a key is set.

The Trainer's own W&B callback logs the loss curves into the run started here; this module adds
the samples table, benchmark scores and the summary. The logged config is the RunConfig, which
holds no secrets by design (keys come from the environment).
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.compare import compare
from tasks.config import WandbConfig


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return cfg.mode


def start_wandb(cfg: WandbConfig, run_id: str, config: dict, local_dir: Path, group: str | None,
                tags: list[str] | None = None):
    """Start the run's W&B run (or return None when disabled); tags e.g. the Prefect deployment."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    import wandb

    local_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        id=run_id,  # the same run id continues the same W&B run when a run is re-executed
        name=run_id,
        group=group,
        job_type="finetune",
        tags=tags or None,
        mode=mode,
        dir=str(local_dir),
        config=config,
        resume="allow",
        reinit="finish_previous",
    )


def log_results(wb_run, samples_before, samples_after, scores: dict, summary: dict, health=None, judge=None) -> None:
    """Samples side by side, per-benchmark scores base vs tuned, the judge's pairs, the run summary
    and training health."""
    if wb_run is None:
        return
    import wandb

    table = wandb.Table(columns=["prompt", "before", "after", "after_stopped_at_eos"])
    for b, a in zip(samples_before, samples_after):
        table.add_data(b.prompt, b.completion, a.completion, a.stopped_at_eos)
    bench = wandb.Table(columns=["benchmark", "metric", "base", "tuned", "delta", "n"])
    for name, pair in scores.items():
        bench.add_data(name, pair["base"].metric, pair["base"].score, pair["tuned"].score,
                       compare(pair["base"], pair["tuned"])["delta"], pair["tuned"].n)
    tables = {"samples": table, "benchmarks": bench}
    if judge is not None:
        pairs = wandb.Table(columns=["instruction", "tuned", "reference", "verdict_tuned_as_a", "verdict_tuned_as_b",
                                     "preference"])
        for r in judge.records:
            pairs.add_data(r["instruction"], r["output"], r["reference_output"], r["verdict_tuned_as_a"],
                           r["verdict_tuned_as_b"], r["preference"])
        tables["judge_pairs"] = pairs
        summary = summary | {f"judge/{k}": getattr(judge, k)
                             for k in ("win_rate", "stderr", "n", "wins", "ties", "losses", "parse_failures")
                             if getattr(judge, k) is not None}
    wb_run.log(tables)
    wb_run.summary.update(summary | bench_summary(scores) | (health.summary() if health is not None else {}))


def bench_summary(scores: dict) -> dict:
    """bench/<name>/{base,tuned,delta}: flat keys the W&B runs table can sort and chart across runs."""
    out = {}
    for name, pair in scores.items():
        c = compare(pair["base"], pair["tuned"])
        out |= {f"bench/{name}/base": pair["base"].score, f"bench/{name}/tuned": pair["tuned"].score,
                f"bench/{name}/delta": c["delta"], f"bench/{name}/beyond_noise": c["beyond_noise"]}
    return out


def wandb_link(wb_run, run_uri: str) -> str | None:
    """The W&B run's URL online; offline, where its files land in the run folder (for `wandb sync`)."""
    if wb_run is None:
        return None
    if wb_run.url:
        return wb_run.url
    return f"{run_uri}/wandb/{Path(wb_run.dir).parent.name}"


def _ref_uri(uri: str) -> str:
    return uri if "://" in uri else Path(uri).resolve().as_uri()


def log_references(wb_run, refs: dict[str, str]) -> dict:
    """Log each {name: run-folder URI} as a W&B artifact that REFERENCES the files (no copy); also put
    the URIs in the summary (artifacts/<name>) so a reader of the summary alone finds them."""
    if wb_run is None:
        return {}
    import wandb

    for name, uri in refs.items():
        art = wandb.Artifact(f"{wb_run.id}-{name}", type="model" if name == "model" else "results")
        # file://: W&B hashes the files itself. s3://: checksum=False records the URI without asking
        # the endpoint (W&B's S3 handler knows only AWS settings); the run manifest has the hashes.
        art.add_reference(_ref_uri(uri), checksum=not uri.startswith("s3://"))
        wb_run.log_artifact(art, aliases=["latest"])
    summary = {f"artifacts/{name}": _ref_uri(uri) for name, uri in refs.items()}
    wb_run.summary.update(summary)
    return summary


def finish_wandb(wb_run, run, trained, before, after, scores: dict, health, promoted: bool, local_dir: Path,
                 judge=None) -> None:
    """Log references, tables and summary, tag a promoted run, close it, and keep its files in the run folder."""
    if wb_run is None:
        return
    refs = {"model": trained.model.path, "benchmarks": run.url("benchmarks"), "report": run.url("report")}
    if judge is not None:
        refs["judge"] = run.url("judge")
    log_references(wb_run, refs)  # W&B points at the run folder's files instead of copying them
    summary = {"eval_loss": trained.metrics["eval_loss"], "run_uri": run.uri, "promoted": promoted}
    log_results(wb_run, before, after, scores, summary, health, judge)
    if promoted:
        wb_run.tags = (*wb_run.tags, "promoted")
    wb_run.finish()
    run.upload_dir(local_dir / "wandb", "wandb")
