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

from tasks.evaluation import comparison_row, score_row
from tasks.config import WandbConfig
from tasks.config_eval import as_run, resolved_in
from tasks.tracking_keys import bench_keys, bench_summary, gate_summary, judge_logs, rounded


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
                tags: list[str] | None = None, job_type: str = "finetune", notes: str | None = None):
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
        notes=notes,
        mode=mode,
        dir=str(local_dir),
        config=config,
        resume="allow",
        reinit="finish_previous",
    )


def start_flow_wandb(config, run_id: str, local_dir: Path, resolved: dict, job_type: str = "finetune",
                     leave_out: dict | None = None, served: str | None = None):
    """start_wandb for a flow run: grouped by its deployment when served (`served`, tasks/runs.py
    served_as: every `nightly` together, a resumed run in the same group, also when resumed from the
    command line), else by the flow's name; the Prefect flow run (id, name, deployment, page) in the
    config under `prefect` and its page in the notes; what each `auto` resolved to under `resolved`;
    a flow's refused sections (`leave_out`: eval's NOT_IN_EVAL) left out."""
    from prefect.runtime import flow_run

    from tasks.runtime import flow_run_link

    link = flow_run_link()
    logged = as_run(config, leave_out)
    logged["resolved"] = resolved_in(resolved, leave_out)
    logged["prefect"] = {"flow_run_id": flow_run.id, "flow_run_name": flow_run.get_name(),
                         "deployment": served, "flow_run_link": link}
    # Which code and packages produced the run, as the manifest records them: W&B's own git capture
    # sees nothing, its run directory being under SMOLFLOW_CACHE, outside the checkout.
    from tasks.storage import package_versions

    logged["versions"] = package_versions()
    return start_wandb(config.wandb, run_id, logged, local_dir, served or flow_run.flow_name,
                       [served] if served else None, job_type,
                       notes=f"Prefect flow run: {link}" if link else None)


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
_COST = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")  # the training's, not the loss
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


def finish_run(wb_run, earlier: list[Path], exit_code: int = 0) -> None:
    """Close the W&B run, then remove the earlier attempts' folders it now holds."""
    import wandb

    wb_run.finish(exit_code=exit_code)
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
    columns = ["benchmark", "metric", "n", "base", "base_stderr", "tuned", "tuned_stderr", "delta", "beyond_noise",
               "comparable", "comparability_key", "source"]
    bench = wandb.Table(columns=columns)
    for name, pair in scores.items():
        row = comparison_row(pair["base"], pair["tuned"]) | {f"{role}_stderr": rounded(pair[role].stderr)
                                                              for role in ("base", "tuned")}
        bench.add_data(*(row[c] for c in columns))
    tables, judged = judge_logs(judge)
    wb_run.log({"samples": table, "benchmarks": bench} | tables)
    wb_run.summary.update(summary | judged | bench_summary(scores) | (health.summary() if health is not None else {}))


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


_SUMMARY_NOTE = "Summary (the report's):\n"


def note_summary(wb_run, run) -> None:
    """The report's summary (verdict, training, scores, judge) in the W&B run's notes, after the
    Prefect link there: what the runs table and the run's overview show without opening a file."""
    from tasks.layout import RunPaths

    if wb_run is None or not run.exists(RunPaths.section("summary")):
        return
    summary = run.read_text(RunPaths.section("summary")).strip().replace("**", "")
    before = (wb_run.notes or "").split(_SUMMARY_NOTE, 1)[0].rstrip()  # a resumed run's earlier attempt's goes
    wb_run.notes = (f"{before}\n\n" if before else "") + _SUMMARY_NOTE + summary


def log_eval_wandb(wb_run, run, scores: dict, judge) -> None:
    """An eval run's W&B run (smolflow eval), before its manifest: the scores table, bench/<name>/*
    keys named as a fine-tune's (its model is the `tuned` one), the judge's pairs and summary, the
    run folder's files. Closed last (close_wandb), so a failure after this still says failed."""
    if wb_run is None:
        return
    import wandb

    columns = ["benchmark", "model", "metric", "n", "score", "stderr", "source", "comparable_to_published",
               "comparability_key"]
    table = wandb.Table(columns=columns)
    summary = {"run_uri": run.uri}
    for name, pair in scores.items():
        for role, result in pair.items():
            row = score_row(role, result)
            table.add_data(*(row[c] for c in columns))
            summary |= bench_keys(name, "tuned", result)
    tables, judged = judge_logs(judge)
    with staging_inside(wb_run):
        wb_run.log({"benchmarks": table} | tables)
        wb_run.summary.update(summary | judged)
        log_run_files(wb_run, run)
    note_summary(wb_run, run)


def close_wandb(wb_run, run, local_dir: Path) -> None:
    """Close an eval run's W&B run once everything else is done; its files go into the run folder
    (the manifest, written before, re-hashed over them)."""
    if wb_run is None:
        return
    finish_run(wb_run, [])
    keep_in_run_folder(run, local_dir)


def log_model_artifact(wb_run, model, promoted: bool) -> None:
    """The tuned model as a W&B model artifact (what `run.log_model` logs), in one collection per
    flow (`smolflow-finetune-model`), so its aliases `latest` and `promoted` move from night to night
    as W&B's model registry expects; its files are not also copied into W&B's artifact cache
    (~/.cache/wandb/artifacts) on upload: nothing trims that cache, and a nightly would add a
    model's copy (~0.5 GB) every night."""
    import wandb
    from prefect.runtime import flow_run

    from tasks.models import local_model_dir

    artifact = wandb.Artifact(f"{flow_run.flow_name or 'smolflow-finetune'}-model", type="model")
    artifact.add_dir(str(local_model_dir(model)), skip_cache=True)
    wb_run.log_artifact(artifact, aliases=["latest", "promoted"] if promoted else ["latest"])


def log_wandb(wb_run, run, trained, before, after, scores: dict, health, judge=None, decision=None,
              reused_from: str | None = None) -> list[Path]:
    """Before the manifest: tables, the run folder's files, the gate's verdict and the summary, with
    smolflow's whole-run train_loss (the Trainer's own is the mean since a resume); returns the
    earlier attempts' folders, which finish_wandb removes once the run is closed."""
    if wb_run is None:
        return []
    summary = {"eval_loss": trained.metrics["eval_loss"], "train_loss": trained.metrics["train_loss"],
               "run_uri": run.uri} | gate_summary(decision)
    with staging_inside(wb_run):
        earlier = fold_in_earlier_attempts(wb_run, trained.log_history)  # before the tables: steps in order
        # A cached training (same model, data, settings) trains nothing here: its curve and Trainer
        # settings are the run's that trained it, logged again and said so.
        if reused_from:
            wb_run.config.update(trained.trainer_args, allow_val_change=True)  # as the Trainer's callback
            if replay_history(wb_run, trained.log_history):
                summary["training/reused_from"] = reused_from
                # Its cost was the earlier run's: kept apart, so a sum over runs counts it once.
                for key in _COST:
                    if (value := wb_run.summary.get(key)) is not None:
                        summary[f"training/reused/{key}"] = value
                        del wb_run.summary[key]
                summary["train_runtime"] = 0.0  # no training time was spent in this run
        log_results(wb_run, before, after, scores, summary, health, judge)
        log_run_files(wb_run, run)
    note_summary(wb_run, run)
    return earlier


def finish_wandb(wb_run, run, local_dir: Path, promoted: bool, earlier: list[Path] = (), model=None) -> None:
    """Once promote() has returned (its compare-and-swap may still reject what the gate passed):
    promoted in the summary, the tag and the model's alias; close the run, keep its folder in the
    run folder (the manifest, written before promotion, re-hashed over it)."""
    if wb_run is None:
        return
    note_summary(wb_run, run)  # the report's again: a re-check at promotion may have rewritten its verdict
    wb_run.summary["promoted"] = promoted
    if model is not None:
        with staging_inside(wb_run):
            log_model_artifact(wb_run, model, promoted)
    if promoted:
        wb_run.tags = (*wb_run.tags, "promoted")
    finish_run(wb_run, earlier)
    keep_in_run_folder(run, local_dir, gone=[folder.name for folder in earlier])


def keep_in_run_folder(run, local_dir: Path, gone: list[str] = ()) -> None:
    """Upload the W&B folder into the run folder's wandb/ (what `wandb sync runs/*/wandb/offline-run-*`
    reads); drop the copies of earlier attempts now folded in; re-hash a manifest written before."""
    from prefect.runtime import flow_run

    from tasks.layout import RunPaths
    from tasks.pointers import rewrite_manifest

    for name in gone:  # uploaded when that attempt failed: the closed run now holds it
        if run.exists(f"wandb/{name}"):
            run.fs.rm(run._path(f"wandb/{name}"), recursive=True)
    run.upload_dir(local_dir / "wandb", "wandb")
    if run.exists(RunPaths.manifest):  # it hashes every object of the run folder, these too
        rewrite_manifest(run, flow_run.flow_name or "smolflow-finetune")


def close_on_stop(wb_run, run, local_dir: Path):
    """For status_recorded: a failed, stopped or timed-out run's W&B run says so (status/state and
    status/why, as status.json), ends with exit code 1 (W&B: failed, not finished) and its folder goes
    into the run folder as a completed run's; earlier attempts' folders stay beside it."""
    def closed(status: dict) -> None:
        # Not started (disabled), or closed already: a failure after finish_wandb (hub push, retention).
        if wb_run is None or getattr(wb_run, "_is_finished", False):
            return
        wb_run.summary.update({"status/state": status["state"], "status/why": status["why"]})
        finish_run(wb_run, [], exit_code=1)
        keep_in_run_folder(run, local_dir)

    return closed
