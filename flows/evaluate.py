"""smolflow-evaluate: score one model, without training, on the run's benchmarks and judge.

    smolflow eval --model builtin:smollm2-135m-instruct
    smolflow eval --model 20261201-020000-nightly-fox      # the tuned model of an earlier run

The benchmark tasks are the fine-tuning flow's own cached tasks: a model scored once with the same
settings (same content fingerprint) is never scored again, whichever flow asked first.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run

from tasks.bookkeeping import begin_run, drop_work_dir, run_flow_options, set_latest, tidy_before_run, tidy_up, write_manifest
from tasks.checks import check_run, resolve_autos
from tasks.checks_eval import check_eval_settings, check_eval_template
from tasks.config import RunConfig
from tasks.config_eval import NOT_IN_EVAL, as_run, resolved_in
from tasks.evaluation import save_scores, score_models
from tasks.judge import run_judge, write_judge
from tasks.layout import RunPaths, run_dir
from tasks.models import ModelRef, resolve_model
from tasks.reporting import write_report
from tasks.runs import flow_run_id, model_of_run, served_as, status_recorded
from tasks.runtime import cache_dir, code_version, flow_run_link, run_logger
from tasks.storage import ArtifactStore
from tasks.tracking import close_on_stop, close_wandb, log_eval_wandb, start_flow_wandb, wandb_link


@flow(name="smolflow-evaluate", **run_flow_options())
def evaluate(config: RunConfig = RunConfig()) -> dict:
    """Model -> benchmarks + custom benchmarks -> judge (against `judge.reference`) -> report -> manifest."""
    started = time.time()  # cache entries used from now on are this run's: never evicted at its end
    threads, placement = begin_run(config.torch_threads, config.execution, config.output.artifacts_uri)  # as a fine-tune
    check_eval_settings(config)
    checked = check_run(config)
    check_eval_template(config, checked.custom)
    root = config.output.artifacts_uri
    run_id = config.output.run_id or flow_run_id(root, "eval-")  # a Retry in the UI: the same run
    tidy_before_run(config.output, run_id)  # as in smolflow-finetune: killed runs and a full disk
    run = ArtifactStore(root).child(run_dir(run_id))
    run.write_json(RunPaths.config, as_run(config, NOT_IN_EVAL))
    work = cache_dir("work", run_id)
    # What each `auto` meant, as a fine-tune records it (resolved.json: the report's "Resolved on this
    # machine", e.g. why W&B logged offline, and the manifest), less the sections eval does not run.
    resolved = resolved_in(resolve_autos(config), NOT_IN_EVAL)
    run.write_json(RunPaths.resolved, resolved)
    # Its W&B config leaves out the sections eval refuses; grouped by deployment (or flow), as a fine-tune's.
    served = served_as(run)
    wb = start_flow_wandb(config, run_id, work, resolved, job_type="eval", leave_out=NOT_IN_EVAL, served=served)

    with status_recorded(run, close_on_stop(wb, run, work), served):  # a failed run says so in its folder and W&B
        found = model_of_run(root, config.model)
        model = ModelRef(**found) if found else resolve_model(config.model)
        scores = score_models({"model": model}, config.benchmarks, checked.custom, config.judge)
        rows = save_scores(run.uri, scores)
        judgement, skipped = None, "judge.enabled: false"
        if config.judge.enabled:
            # 'base' has no meaning without a fine-tune: the reference is the default model (`auto`).
            reference = resolve_model("auto") if config.judge.reference == "base" else model
            if reference.fingerprint == model.fingerprint and config.judge.reference == "base":
                skipped = ("the evaluated model is the default model, the judge's reference (judge.reference: base); "
                           "set judge.reference to a file of reference outputs to judge it")
                run_logger().info("Judge skipped: %s", skipped)
            else:
                judgement = run_judge(reference, model, config.judge, config.sampling.prompts,
                                      config.sampling.max_new_tokens)
        write_judge(run, judgement, skipped)
        summary = write_report(run.uri, as_run(config, NOT_IN_EVAL), None,
                               {"W&B run": wandb_link(wb, run.uri), "Prefect flow run": flow_run_link(),
                                "code": code_version()})
        log_eval_wandb(wb, run, scores, judgement)
        write_manifest(run.uri, {"run_id": run_id, "kind": "eval", "tuned_model": model.model_dump(), "resolved": resolved,
                                 "torch_threads": threads, "execution": placement.model_dump(mode="json"),
                                 "completed_at": datetime.now(timezone.utc).isoformat()})
        set_latest(root, flow_run.flow_name, run_id)
        # Old runs and the cache over its bound go, as after a fine-tune (output.keep_*).
        tidy_up(config.output, run_id, [model.path] + ([reference.path] if judgement else []), started)
        # Last, so a failure above closes the W&B run failed (close_on_stop); the manifest is re-hashed.
        close_wandb(wb, run, work)
        drop_work_dir(run_id)
        summary.pop("training", None)  # nothing trained here: `training: null` in what it prints said nothing
        if judgement is None:  # why, as the report's judge section says it
            summary["judge"] = f"not run: {skipped}"
        return summary | {"model": model.path, "benchmarks": rows, "manifest": run.url(RunPaths.manifest)}
