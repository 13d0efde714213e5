"""Weights & Biases: one run per flow run, offline files by default, online when a key is set.

The Trainer's own W&B callback logs the loss curves into the run started here; this module adds
the samples table, benchmark scores, the gate's decision and the summary, and copies the run
folder's report, curves and result files into the W&B run as real files (`files/smolflow/...`),
so an offline run synced later, from any machine, carries them: `wandb sync <run>/wandb/offline-run-*`.
The logged config is the RunConfig, which holds no secrets by design (keys come from the environment).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tasks.evaluation import comparison_row
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
    columns = ["benchmark", "metric", "n", "base", "tuned", "delta", "beyond_noise", "comparable", "source"]
    bench = wandb.Table(columns=columns)
    for row in (comparison_row(pair["base"], pair["tuned"]) for pair in scores.values()):
        bench.add_data(*(row[c] for c in columns))
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
        row = comparison_row(pair["base"], pair["tuned"])
        out |= {f"bench/{name}/base": pair["base"].score, f"bench/{name}/tuned": pair["tuned"].score,
                f"bench/{name}/beyond_noise": row["beyond_noise"], f"bench/{name}/source": row["source"],
                f"bench/{name}/comparable_to_published": row["comparable_to_published"]}
        if row["delta"] is not None:  # scores measured differently have no delta
            out[f"bench/{name}/delta"] = row["delta"]
    return out


def wandb_link(wb_run, run_uri: str) -> str | None:
    """The W&B run's URL online; offline, where its files land in the run folder (for `wandb sync`)."""
    if wb_run is None:
        return None
    if wb_run.url:
        return wb_run.url
    return f"{run_uri}/wandb/{Path(wb_run.dir).parent.name}"


# Not copied into the W&B run: the model (optional, as a model artifact), training checkpoints,
# W&B's own folder, and the manifest (written after this, over the final files).
_NOT_LOGGED = ("model/", "checkpoints/", "wandb/", "manifest.json")


@contextlib.contextmanager
def staging_inside(wb_run):
    """W&B copies a logged Table or model into a staging folder until upload, by default in the
    user's data dir, outside the run: put it inside the run's folder so it travels with it."""
    old = os.environ.get("WANDB_DATA_DIR")
    os.environ["WANDB_DATA_DIR"] = str(Path(wb_run.dir).parent / "staging")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WANDB_DATA_DIR", None)
        else:
            os.environ["WANDB_DATA_DIR"] = old


def log_run_files(wb_run, run) -> list[str]:
    """Copy the run folder's files (report, curves, tables, benchmark and judge results, gate) into
    the W&B run's files as smolflow/<path>; returns the paths."""
    if wb_run is None:
        return []
    target = Path(wb_run.dir) / "smolflow"
    names = [n for n in run.list_files() if not n.startswith(_NOT_LOGGED)]
    for name in names:
        local = target / name
        local.parent.mkdir(parents=True, exist_ok=True)
        run.fs.get_file(run.child(name).root, str(local))
        # Inside the run's own files folder W&B records a relative path: no symlink, no absolute path.
        wb_run.save(str(local), base_path=wb_run.dir, policy="now")
    return names


def gate_summary(decision, promoted: bool) -> dict:
    """gate/promoted, gate/against (the base model or the promoted run), gate/reasons (why not; empty
    when promoted)."""
    if decision is None:
        return {"promoted": promoted}
    return {"promoted": promoted, "gate/promoted": promoted, "gate/against": decision.against,
            "gate/reasons": list(decision.reasons)}


def finish_wandb(wb_run, run, trained, before, after, scores: dict, health, promoted: bool, local_dir: Path,
                 judge=None, decision=None, log_model: bool = False) -> None:
    """Log tables, the run folder's files, the gate and the summary (and the model if asked), tag a
    promoted run, close it, and keep its files in the run folder."""
    if wb_run is None:
        return
    summary = {"eval_loss": trained.metrics["eval_loss"], "run_uri": run.uri} | gate_summary(decision, promoted)
    with staging_inside(wb_run):
        log_results(wb_run, before, after, scores, summary, health, judge)
        log_run_files(wb_run, run)
        if log_model:
            from tasks.models import local_model_dir

            wb_run.log_model(str(local_model_dir(trained.model)), name=f"{wb_run.id}-model",
                             aliases=["latest", "promoted"] if promoted else ["latest"])
    if promoted:
        wb_run.tags = (*wb_run.tags, "promoted")
    wb_run.finish()
    run.upload_dir(local_dir / "wandb", "wandb")
