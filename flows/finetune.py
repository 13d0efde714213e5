"""smolflow: fine-tune a small chat model and score it before and after, as one Prefect flow.

    python -m flows.finetune                       # embedded defaults (offline with HF_HUB_OFFLINE=1)
    python -m flows.finetune --config run.yaml --training.max-steps 100
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

import yaml
from prefect import flow
from prefect.runtime import deployment, flow_run

from tasks.checks import check_run
from tasks.config import RunConfig
from tasks.data import load_chat_dataset
from tasks.evaluation import score_base_and_tuned
from tasks.gate import promote, regression_gate
from tasks.generation import generate_samples
from tasks.health import assess_training
from tasks.judge import run_judge, write_judge
from tasks.models import resolve_model
from tasks.reporting import write_report
from tasks.retention import tidy_up
from tasks.runtime import cache_dir, set_torch_threads
from tasks.storage import ArtifactStore, set_latest, write_manifest
from tasks.templates import prepare_chat_template, write_template_preview
from tasks.tokenization import tokenize_dataset, write_token_stats
from tasks.tracking import finish_wandb, start_wandb, wandb_link
from tasks.training import publish_model, train_or_reuse
from tasks.transfer import model_exists


@flow(name="smolflow-finetune")
def finetune(config: RunConfig = RunConfig()) -> dict:
    """Data -> template -> tokens -> samples -> SFT -> samples -> health -> benchmarks + judge -> gate -> report -> manifest."""
    started = time.time()  # cache entries used from now on are this run's: never evicted at its end
    threads = set_torch_threads(config.torch_threads)
    checked = check_run(config)  # the user's files are read and checked before any compute
    run_id = config.output.run_id or f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{flow_run.get_name() or 'local'}"
    run = ArtifactStore(config.output.artifacts_uri).child("runs", run_id)
    run.write_json("config.json", config.model_dump(mode="json"))
    tags = [deployment.name] if deployment.name else None  # which schedule/deployment started it
    wb = start_wandb(config.wandb, run_id, config.model_dump(mode="json"), cache_dir("work", run_id),
                     flow_run.get_name(), tags)

    base = resolve_model(config.model)
    data = load_chat_dataset(config.data)
    templated = prepare_chat_template(base, data, config.template)
    if not model_exists(templated.model.path):  # a cached result whose model the cache bound evicted
        templated = prepare_chat_template.with_options(refresh_cache=True)(base, data, config.template)
    write_template_preview(run, templated)
    prompts, max_new = config.sampling.prompts, config.sampling.max_new_tokens
    before = generate_samples(templated.model, prompts, max_new)
    tokens = tokenize_dataset(templated.model, data, config.training.max_length, templated.assistant_only)
    write_token_stats(run, tokens.stats)
    trained = train_or_reuse(templated.model, data, config.training, run.uri, ["wandb"] if wb else [],
                           assistant_only_loss=templated.assistant_only)
    trained.model = publish_model(trained.model, run.uri)  # a cache hit points at an earlier run
    after = generate_samples(trained.model, prompts, max_new)
    health = assess_training(trained.log_history, after)
    scores = score_base_and_tuned(templated.model, trained.model, config.benchmarks, checked.custom, config.judge)
    judgement = run_judge(templated.model, trained.model, config.judge, prompts)
    if judgement:
        write_judge(run, judgement)

    decision = regression_gate(
        config.output.artifacts_uri, flow_run.flow_name, run.uri,
        {name: pair["base"] for name, pair in scores.items()},
        {name: pair["tuned"] for name, pair in scores.items()},
        config.gate.tolerance, health.blocking(),
    )
    promoted = decision.promote and config.gate.enabled
    summary = write_report(
        run.uri, templated.rendered_example, before, after, trained, scores, wandb_link(wb, run.uri), health,
        config.model_dump(mode="json"), data, decision, config.output.artifacts_uri, gate_enabled=config.gate.enabled,
        judge=judgement, token_stats=tokens.stats,
    )
    finish_wandb(wb, run, trained, before, after, scores, health, promoted, cache_dir("work", run_id), judgement)
    write_manifest(
        run.uri,
        {
            "run_id": run_id,
            "base_model": templated.model.model_dump(),
            "tuned_model": trained.model.model_dump(),
            "dataset": data.model_dump(),
            "torch_threads": threads,
            "completed_at": datetime.now(timezone.utc).isoformat(),
        },
    )
    set_latest(config.output.artifacts_uri, flow_run.flow_name, run_id)  # after the manifest, never before
    if promoted:
        promote(config.output.artifacts_uri, flow_run.flow_name, run_id)
    # Last, once manifest and pointers are written: work dir, old runs and cache over its bound go.
    in_use = [base.path, templated.model.path, trained.model.path, data.path, tokens.path]
    tidy_up(config.output, run_id, in_use, started)
    return summary | {"manifest": run.url("manifest.json"), "promoted": promoted, "gate": decision.reasons}


def parse_args(argv: list[str]) -> RunConfig:
    """`--config FILE.yaml` for a whole config, then `--section.field value` flags on top."""
    from pydantic_settings import CliApp

    data = {}
    if "--config" in argv:
        i = argv.index("--config")
        with open(argv[i + 1]) as f:
            data = yaml.safe_load(f) or {}
        argv = argv[:i] + argv[i + 2 :]
    return CliApp.run(RunConfig, cli_args=argv, **data)


if __name__ == "__main__":
    result = finetune(config=parse_args(sys.argv[1:]))
    print(yaml.safe_dump(result, sort_keys=False))
