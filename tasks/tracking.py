"""Weights & Biases: one run per flow run, offline files by default, online when a key is set.

The Trainer's own W&B callback logs the loss curves into the run started here; this module adds
the samples table, benchmark scores and the summary. The logged config is the RunConfig, which
holds no secrets by design (keys come from the environment).
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.config import WandbConfig


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return cfg.mode


def start_wandb(cfg: WandbConfig, run_id: str, config: dict, local_dir: Path, group: str | None):
    """Start the run's W&B run (or return None when disabled)."""
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
        mode=mode,
        dir=str(local_dir),
        config=config,
        resume="allow",
        reinit="finish_previous",
    )


def log_results(wb_run, samples_before, samples_after, scores: dict, summary: dict) -> None:
    """Samples side by side, per-benchmark scores base vs tuned, and the run summary."""
    if wb_run is None:
        return
    import wandb

    table = wandb.Table(columns=["prompt", "before", "after", "after_stopped_at_eos"])
    for b, a in zip(samples_before, samples_after):
        table.add_data(b.prompt, b.completion, a.completion, a.stopped_at_eos)
    bench = wandb.Table(columns=["benchmark", "metric", "base", "tuned", "delta", "n"])
    for name, pair in scores.items():
        bench.add_data(name, pair["base"].metric, pair["base"].score, pair["tuned"].score,
                       pair["tuned"].score - pair["base"].score, pair["tuned"].n)
    wb_run.log({"samples": table, "benchmarks": bench})
    wb_run.summary.update(summary)
