"""smolflow: fine-tune a small chat model and score it before and after, as one Prefect flow.

    smolflow run                                  # embedded defaults (offline with HF_HUB_OFFLINE=1)
    smolflow run --config run.yaml --training.max-steps 100
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run

from tasks.bookkeeping import begin_run, drop_work_dir, run_flow_options, set_latest, tidy_before_run, tidy_up, write_manifest
from tasks.checks import check_inputs, check_run, resolve_autos
from tasks.config import RunConfig
from tasks.data import load_chat_dataset
from tasks.evaluation import save_scores, score_base_and_tuned
from tasks.gate import promote, regression_gate
from tasks.generation import generate_samples, save_samples
from tasks.health import assess_training, save_training
from tasks.hub import push_model
from tasks.judge import run_judge, write_judge
from tasks.layout import RunPaths, run_dir
from tasks.models import resolve_model
from tasks.pointers import rewrite_manifest
from tasks.reference import rescore_promoted
from tasks.special_tokens import control_tokens
from tasks.reporting import write_report
from tasks.runs import flow_run_id, served_as, status_recorded
from tasks.runtime import cache_dir, code_version, flow_run_link
from tasks.storage import ArtifactStore
from tasks.templates import prepare_chat_template, write_template_preview
from tasks.tokenization import tokenize_dataset, write_token_stats
from tasks.tracking import close_on_stop, finish_wandb, log_wandb, start_flow_wandb, wandb_link
from tasks.training import publish_model, train_or_reuse
from tasks.transfer import model_exists


@flow(name="smolflow-finetune", **run_flow_options())
def finetune(config: RunConfig = RunConfig()) -> dict:
    """Data -> template -> tokens -> samples -> SFT -> samples -> health -> benchmarks + judge -> gate -> report -> manifest."""
    started = time.time()  # cache entries used from now on are this run's: never evicted at its end
    # Threads, device and precision; what a killed earlier run left goes first.
    threads, placement = begin_run(config.torch_threads, config.execution, config.output.artifacts_uri)
    check_inputs(config)  # a missing model, path or split, or a bad row: failed before anything is written
    checked = check_run(config)  # the user's files are read and checked before any compute
    run_id = config.output.run_id or flow_run_id(config.output.artifacts_uri)  # a Retry in the UI: the same run
    # Retention before anything is written: a night that is SIGKILLed (OOM killer, reboot) runs no
    # end-of-run hook, and a full disk must be freed before this run's first write, not after it failed.
    tidy_before_run(config.output, run_id)
    run = ArtifactStore(config.output.artifacts_uri).child(run_dir(run_id))
    run.write_json(RunPaths.config, config.model_dump(mode="json"))
    resolved = resolve_autos(config)  # what each `auto` meant here, now
    run.write_json(RunPaths.resolved, resolved)
    work = cache_dir("work", run_id)
    served = served_as(run)  # its deployment, also when a served night is resumed from the command line
    wb = start_flow_wandb(config, run_id, work, resolved, served=served)  # grouped by deployment (or flow)

    with status_recorded(run, close_on_stop(wb, run, work), served):  # a failed run says so, and why, in its folder and W&B
        base = resolve_model(config.model)
        data = load_chat_dataset(config.data, control_tokens(base, config.template))  # special tokens typed in text
        templated = prepare_chat_template(base, data, config.template)
        if not model_exists(templated.model.path):  # a cached result whose model the cache bound evicted
            templated = prepare_chat_template.with_options(refresh_cache=True)(base, data, config.template)
        write_template_preview(run, templated)
        prompts, max_new = config.sampling.prompts, config.sampling.max_new_tokens
        before = generate_samples(templated.model, prompts, max_new, role="base")
        tokens = tokenize_dataset(templated.model, data, config.training.max_length, templated.assistant_only)
        write_token_stats(run, tokens.stats, data)
        trained = train_or_reuse(templated.model, tokens, config.training, run.uri, ["wandb"] if wb else [])
        reused_from = None if trained.model.path.rstrip("/") == run.url(RunPaths.model) else trained.model.path
        trained.model = publish_model(trained.model, run.uri)  # a cache hit points at an earlier run
        run.write_json(RunPaths.trainer_args, trained.trainer_args)  # every Trainer setting as it ran
        after = generate_samples(trained.model, prompts, max_new, let_go_on=True, role="tuned")  # long answer or runaway?
        save_samples(run.uri, before, after)
        health = assess_training(trained.log_history, after)
        save_training(run.uri, trained.metrics, trained.log_history, health, reused_from)
        scores = score_base_and_tuned(templated.model, trained.model, config.benchmarks, checked.custom, config.judge)
        save_scores(run.uri, scores)
        root = config.output.artifacts_uri
        # The promoted model again, on the benchmarks its saved scores were measured otherwise (the gate's reference).
        rescore_promoted(root, flow_run.flow_name, run.uri, config.gate, scores, config.benchmarks, checked.custom,
                         config.judge)
        judgement = run_judge(templated.model, trained.model, config.judge, prompts, max_new)
        write_judge(run, judgement)

        decision = regression_gate(root, flow_run.flow_name, run.uri, config.gate, health.blocking())
        about = {"W&B run": wandb_link(wb, run.uri), "Prefect flow run": flow_run_link(), "code": code_version()}
        summary = write_report(run.uri, config.model_dump(mode="json"), root, about)
        earlier = log_wandb(wb, run, trained, before, after, scores, health, judgement, decision, reused_from)
        write_manifest(
            run.uri,
            {
                "run_id": run_id,
                "base_model": templated.model.model_dump(),
                "tuned_model": trained.model.model_dump(),
                "dataset": data.model_dump(),
                "template": {"name": templated.template_name, "assistant_only_loss": templated.assistant_only,
                             "why": templated.loss_why},  # what template.assistant_only_loss 'auto' decided
                "resolved": run.read_json(RunPaths.resolved),
                "torch_threads": threads,
                "execution": placement.model_dump(mode="json"),
                "completed_at": datetime.now(timezone.utc).isoformat(),
            },
        )
        set_latest(root, flow_run.flow_name, run_id)  # after the manifest, never before
        promoted = decision.promote
        if promoted:  # compare-and-swap: re-checked against whatever was promoted since the gate
            promoted = promote(root, flow_run.flow_name, run_id, decision, config.gate.tolerance,
                               config.gate.allow_incomparable) is not None
            if not promoted:  # rejected by that re-check, which rewrote the gate's decision: the report says so too
                summary = write_report(run.uri, config.model_dump(mode="json"), root, about)
                rewrite_manifest(run, flow_run.flow_name)
        hub = None
        if config.output.push_to_hub and promoted:  # never a rejected model
            hub = push_model(trained.model, config.output, run_id)
        # Once manifest, pointers and hub push are done: old runs, cache over its bound.
        tidy_up(config.output, run_id, [base.path, templated.model.path, trained.model.path, data.path, tokens.path],
                started)
        # Only now does W&B say promoted (summary, tag, the model's alias); a failure above (hub push,
        # retention) still closes it failed (close_on_stop). The manifest is re-hashed over its files.
        finish_wandb(wb, run, work, promoted, earlier, trained.model if config.wandb.log_model else None)
        drop_work_dir(run_id)
        return summary | {"manifest": run.url(RunPaths.manifest), "promoted": promoted,
                          "gate": run.read_json(RunPaths.gate)["reasons"]} | ({"hub": hub} if config.output.push_to_hub else {})

