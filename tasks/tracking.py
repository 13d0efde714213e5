"""Weights & Biases: one run per flow run, offline files by default, online when a key is set and
W&B's host answers (`wandb.mode: auto`; else offline files and one warning line saying why).

The Trainer's own W&B callback logs the loss curves into the run started here; this module adds
the samples table, benchmark scores, the gate's decision and the summary, and copies the run
folder's report, curves and result files into the W&B run as real files (`files/smolflow/...`),
so an offline run synced later, from any machine, carries them: `wandb sync <run>/wandb/offline-run-*`.
The logged config is the RunConfig, which holds no secrets by design (keys come from the environment).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from tasks.evaluation import comparison_row
from tasks.config import WandbConfig


def wandb_mode(cfg: WandbConfig) -> str:
    """The mode W&B runs in. 'auto': online when WANDB_API_KEY is set and W&B's host (WANDB_BASE_URL,
    else api.wandb.ai) answers within a few seconds; else offline files, with one warning line saying
    why when a key is set, rather than a CommError after the model is loaded."""
    from tasks.reachable import auto_wandb_mode

    mode, why = auto_wandb_mode(cfg)
    if why:
        from tasks.runtime import run_logger

        run_logger().warning("wandb.mode 'auto': logging offline, %s; `wandb sync` the run folder's wandb/ "
                             "later, or set wandb.mode 'offline' to skip this check", why)
    return mode


def start_wandb(cfg: WandbConfig, run_id: str, config: dict, local_dir: Path, group: str | None,
                tags: list[str] | None = None, job_type: str = "finetune"):
    """Start the run's W&B run (or return None when disabled); tags e.g. the Prefect deployment."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    import wandb

    _skip_unused_launch_import()
    local_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        id=run_id,  # the same run id continues the same W&B run when a run is re-executed
        name=run_id,
        group=group,
        job_type=job_type,
        tags=tags or None,
        mode=mode,
        dir=str(local_dir),
        config=config,
        resume="allow",
        reinit="finish_previous",
    )


def _skip_unused_launch_import() -> None:
    """Every `wandb.init` imports W&B's whole Launch SDK (~1.6 s here, an eighth of a cached re-run)
    only to apply job inputs staged through `wandb.sdk.launch` in this process. None can be staged
    while that package has not been imported, so then the step is skipped; the same as W&B's, for
    free. (wandb 0.31's `Run._detect_and_apply_job_inputs`; left alone if a version lacks it.)"""
    import sys

    from wandb.sdk.wandb_run import Run

    original = getattr(Run, "_detect_and_apply_job_inputs", None)
    if original is None or getattr(original, "_smolflow", False):
        return

    def detect_and_apply_job_inputs(self) -> None:
        if "wandb.sdk.launch.inputs.internal" in sys.modules:
            original(self)

    detect_and_apply_job_inputs._smolflow = True
    Run._detect_and_apply_job_inputs = detect_and_apply_job_inputs


# ---- a re-run after a crash continues one W&B run folder ----------------------------------
# wandb 0.31 writes one offline folder per process, `offline-run-<start time>-<id>`: `wandb.init`
# stamps the start time and adds `-1` to a name that exists, so no setting reuses a folder, and the
# re-run of a crashed run (same id, resume="allow") starts a second one. The re-run's folder is
# made to hold the whole run instead: the curve up to the resumed checkpoint is logged into it again
# before training goes on, the crashed attempts' console logs and files are carried over, and the
# earlier folders are removed once this run is closed. The curve comes from the checkpoint's own
# Trainer state, not from the killed folder: W&B writes its transaction log every 15 s, and a
# process killed just after checkpoint-6 was complete had left only steps 1-5 there (measured).

# Logged by transformers' WandbCallback into the summary, not as history rows (its on_log).
_ONCE = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")
# W&B's own files in a run's files/ folder, written afresh by every process: not carried over.
_WANDB_OWN = {"wandb-metadata.json", "wandb-summary.json", "config.yaml", "requirements.txt"}


def replay_history(wb_run, log_history: list[dict], up_to: float = float("inf")) -> int:
    """Log the Trainer's rows whose step this W&B run has not logged yet (up to `up_to`), keyed as
    the Trainer's W&B callback keys them; returns how many."""
    # A fresh W&B process (the re-run) has an empty summary; one that already logged steps (e.g. a
    # Prefect retry in the same process) must not get them twice.
    logged = wb_run.summary.get("train/global_step") or 0
    rows = [r for r in log_history if logged < r["step"] <= up_to]
    if rows:
        wb_run.define_metric("train/global_step")  # as the Trainer's callback: the x axis of every chart
        wb_run.define_metric("*", step_metric="train/global_step", step_sync=True)
    for row in rows:
        logs = {k: v for k, v in row.items() if k != "step"}
        wb_run.summary.update({k: logs.pop(k) for k in _ONCE if k in logs})
        wb_run.log(trainer_keys(logs) | {"train/global_step": row["step"]})
    return len(rows)


def trainer_keys(logs: dict) -> dict:
    """A Trainer log row keyed as its W&B callback keys it (transformers' `rewrite_logs`: eval_x ->
    eval/x, test_x -> test/x, anything else train/x), without importing transformers' integrations:
    ~5 s of a cached re-run, which loads no model (tests/test_run_console_wandb.py checks both agree)."""
    return {(f"eval/{k[5:]}" if k.startswith("eval_") else f"test/{k[5:]}" if k.startswith("test_")
             else f"train/{k}"): v for k, v in logs.items()}


def resumed_curve():
    """A TrainerCallback: a training resumed from a checkpoint first logs the checkpoint's earlier
    steps into the W&B run that lacks them, so its history runs from step 1, in order."""
    from transformers import TrainerCallback

    class ReplayResumedSteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            import wandb

            # The Trainer restored state (global_step, log_history) from the checkpoint before this.
            if wandb.run is not None and state.is_world_process_zero and state.global_step > 0:
                replay_history(wandb.run, state.log_history, up_to=state.global_step)

    return ReplayResumedSteps()


def earlier_attempts(wb_run) -> list[Path]:
    """Offline folders that earlier processes (crashed attempts) of this W&B run left next to its
    own, oldest first; none online, where W&B's server continues the run itself."""
    here = Path(wb_run.dir).parent
    if not here.name.startswith("offline-run-"):
        return []
    # The transaction log's name holds the exact id: a folder name alone cannot tell id `a` with
    # W&B's suffix `-1` from id `a-1`.
    return sorted(p for p in here.parent.glob("offline-run-*")
                  if p != here and (p / f"run-{wb_run.id}.wandb").is_file())


def fold_in_earlier_attempts(wb_run, log_history: list[dict]) -> list[Path]:
    """Before the run's final logs: its curve when training was reused rather than resumed (the crash
    came after it), then the earlier attempts' files; returns the folders to drop once it is closed."""
    earlier = earlier_attempts(wb_run)
    if not earlier:
        return []
    replay_history(wb_run, log_history)  # nothing when this process trained: its steps are logged
    files = Path(wb_run.dir)
    for folder in reversed(earlier):  # newest first: of two earlier copies of a file, the newer one is kept
        for src in sorted(p for p in (folder / "files").rglob("*") if p.is_file()):
            rel = src.relative_to(folder / "files").as_posix()
            if rel == "output.log":  # the crashed attempt's console: why it stopped
                rel = f"earlier-attempts/{folder.name}/output.log"
            elif rel in _WANDB_OWN or rel.startswith("media/"):  # media: tables the re-run logs again
                continue
            target = files / rel
            if target.exists():  # the re-run's own copy (or one carried already) wins
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
            wb_run.save(str(target), base_path=wb_run.dir, policy="now")
    return earlier


def finish_run(wb_run, earlier: list[Path]) -> None:
    """Close the W&B run, then remove the earlier attempts' folders it now holds."""
    import wandb

    wb_run.finish()
    # finish() can return a moment before W&B's service has closed the run file: under load a copy
    # taken right away lacked the summary (the arena saw it, then a CI run's eval). teardown waits
    # for the service to exit; the next run in this process starts a new one.
    wandb.teardown()
    # Only now: the transaction log is written and closed. A crash before this leaves the earlier
    # folders in place, and the next attempt folds them in again (the curve from its checkpoint,
    # their files), so two or more earlier folders are handled the same way.
    for folder in earlier:
        shutil.rmtree(folder, ignore_errors=True)


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


def finish_eval_wandb(wb_run, run, rows: list[dict], judge, local_dir: Path) -> None:
    """An eval run's W&B run (smolflow eval): the scores table, bench/<name>/score keys the runs
    table can sort, the judge's summary, the run folder's files; closed, its files kept in the run
    folder as a fine-tune's are."""
    if wb_run is None:
        return
    import wandb

    columns = ["benchmark", "model", "metric", "n", "score", "stderr", "source", "comparable_to_published"]
    table = wandb.Table(columns=columns)
    summary = {"run_uri": run.uri}
    for row in rows:
        table.add_data(*(row[c] for c in columns))
        summary |= {f"bench/{row['benchmark']}/{key}": row[key] for key in ("score", "source", "comparable_to_published")}
    if judge is not None:
        summary |= {f"judge/{k}": getattr(judge, k) for k in ("win_rate", "stderr", "n", "wins", "ties", "losses",
                                                                "parse_failures") if getattr(judge, k) is not None}
    with staging_inside(wb_run):
        wb_run.log({"benchmarks": table})
        wb_run.summary.update(summary)
        log_run_files(wb_run, run)
    finish_run(wb_run, [])
    run.upload_dir(local_dir / "wandb", "wandb")


def log_model_artifact(wb_run, model: str, promoted: bool) -> None:
    """The tuned model as a W&B model artifact (what `run.log_model` logs), except that its files are
    not also copied into W&B's artifact cache (~/.cache/wandb/artifacts) on upload: nothing trims that
    cache on a schedule, and a nightly would add a model's copy (~0.5 GB) every night."""
    import wandb

    from tasks.models import local_model_dir

    artifact = wandb.Artifact(f"{wb_run.id}-model", type="model")
    artifact.add_dir(str(local_model_dir(model)), skip_cache=True)
    wb_run.log_artifact(artifact, aliases=["latest", "promoted"] if promoted else ["latest"])


def finish_wandb(wb_run, run, trained, before, after, scores: dict, health, promoted: bool, local_dir: Path,
                 judge=None, decision=None, log_model: bool = False, reused_from: str | None = None) -> None:
    """Log tables, the run folder's files, the gate and the summary (and the model if asked), tag a
    promoted run, close it, and keep its files in the run folder."""
    if wb_run is None:
        return
    summary = {"eval_loss": trained.metrics["eval_loss"], "run_uri": run.uri} | gate_summary(decision, promoted)
    with staging_inside(wb_run):
        earlier = fold_in_earlier_attempts(wb_run, trained.log_history)  # before the tables: steps in order
        # A cached training (same model, data, settings) trains nothing here: its curve is the run's
        # that trained it, logged again and said so, so every nightly in W&B has its loss curve.
        if reused_from and replay_history(wb_run, trained.log_history):
            summary["training/reused_from"] = reused_from
        log_results(wb_run, before, after, scores, summary, health, judge)
        log_run_files(wb_run, run)
        if log_model:
            log_model_artifact(wb_run, trained.model, promoted)
    if promoted:
        wb_run.tags = (*wb_run.tags, "promoted")
    finish_run(wb_run, earlier)
    run.upload_dir(local_dir / "wandb", "wandb")
