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

from tasks.caching import results_storage
from tasks.checks import check_run, resolve_autos
from tasks.config import RunConfig
from tasks.config_eval import NOT_IN_EVAL, as_run, resolved_in
from tasks.config_base import unused
from tasks.console import configure_logging
from tasks.device import publish, unpublish
from tasks.evaluation import save_scores, score_models
from tasks.judge import run_judge, write_judge
from tasks.layout import RunPaths, run_dir
from tasks.leftovers import own_temp_root
from tasks.models import ModelRef, resolve_model
from tasks.prefect_vacuum import vacuum_temporary_server_db
from tasks.reporting import write_report
from tasks.retention import drop_work_dir, tidy_after_failure, tidy_before_run, tidy_up
from tasks.runs import flow_run_id, model_of_run, served_as, status_recorded
from tasks.runtime import cache_dir, code_version, flow_run_link, run_logger, run_timeout, set_torch_threads
from tasks.sandbox import hide_from_sandbox
from tasks.storage import ArtifactStore, set_latest, write_manifest
from tasks.tracking import close_on_stop, close_wandb, log_eval_wandb, start_flow_wandb, wandb_link


def check_eval_settings(config: RunConfig) -> None:
    """smolflow eval scores a model and trains nothing: a setting of a stage it does not run (data,
    template, training, samples, gate, hub push, a model for W&B), moved off its default, would have
    no effect, so it is refused, naming it (ValueError). Retention (output.keep_*) and W&B apply."""
    scoring_only = "smolflow eval scores a model and trains nothing, so it has no {} (smolflow run does)"
    what = {"data": "training data", "template": "chat template to apply", "training": "training",
            "gate": "promotion gate", "sampling": "before/after samples", "output": "new model to push",
            "wandb": "new model to log"}
    judge_reads_prompts = config.judge.enabled and config.judge.instructions == "samples"
    for section, fields in NOT_IN_EVAL.items():
        part = getattr(config, section)
        fields = tuple(type(part).model_fields) if fields is None else fields
        if section == "sampling" and not judge_reads_prompts:
            fields += ("prompts",)
        why = scoring_only.format(what[section]) + ("; sampling.prompts serves only as the judge's instructions "
                                                    "(judge.instructions: samples)" if section == "sampling" else "")
        unused(part, fields, f"{section}.", why)
    judge = config.judge
    if judge.enabled and judge.reference == "base":
        from tasks.models import resolve_source

        if resolve_source(config.model) == resolve_source("auto"):  # the flow skips the judge (its own reference)
            unused(judge, tuple(n for n in type(judge).model_fields if n not in ("enabled", "reference")), "judge.",
                   f"the judge is skipped: model={config.model!r} is the default model, the judge's reference "
                   "(judge.reference: base); set judge.reference to a file of reference outputs, or judge.enabled: false")


def check_eval_template(config: RunConfig, custom: list) -> None:
    """The evaluated model answers the judge's instructions, and the custom benchmarks with
    chat_template: true, through its chat template: a model without one (a base model) failed there,
    after the benchmarks before it, in transformers' words. Said before any model runs, naming what needs it."""
    from tasks.checks import check_chat_template

    needs, fixes = [], []
    if config.judge.enabled:
        needs.append("the judge's instructions (judge.enabled: true)")
        fixes.append("judge.enabled: false")
    if chat := [b for b in custom if b.chat_template]:
        needs += [f"custom benchmark {b.name!r} (chat_template: true in {b.path})" for b in chat]
        fixes.append("chat_template: false in " + ("that definition" if len(chat) == 1 else "those definitions"))
    if needs:
        check_chat_template(config.model, "model", f"answer {' or '.join(needs)}; evaluate a model with a chat "
                            f"template, or set {' and '.join(fixes)}")


# unpublish: the run's device/precision/task-runner settings end with it (tasks/device.py).
@flow(name="smolflow-evaluate", result_storage=results_storage(),  # under the cache bound: tasks/caching.py
      timeout_seconds=run_timeout(),  # SMOLFLOW_RUN_TIMEOUT_HOURS: a hung run ends, its slot frees
      on_completion=[unpublish], on_failure=[unpublish, tidy_after_failure], on_crashed=[unpublish, tidy_after_failure],
      on_cancellation=[unpublish, tidy_after_failure])  # stopped (SIGTERM, a cancel) runs are bounded too
def evaluate(config: RunConfig = RunConfig()) -> dict:
    """Model -> benchmarks + custom benchmarks -> judge (against `judge.reference`) -> report -> manifest."""
    own_temp_root()  # this process's temporary files: a SIGKILLed run's go with the next start
    configure_logging()  # quiet unless SMOLFLOW_VERBOSE=1 (smolflow --verbose)
    started = time.time()  # cache entries used from now on are this run's: never evicted at its end
    check_eval_settings(config)
    threads = set_torch_threads(config.torch_threads)
    checked = check_run(config)
    check_eval_template(config, checked.custom)
    placement = publish(config.execution)  # as in smolflow-finetune: every model, and Ray if asked
    hide_from_sandbox(config.output.artifacts_uri)  # HumanEval's programs cannot read the runs
    vacuum_temporary_server_db()  # its flow-run vacuum never runs in a temporary server: months of runs stayed
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
        return summary | {"model": model.path, "benchmarks": rows, "manifest": run.url(RunPaths.manifest)}
