"""smolflow arena: blind battles between models, judged and voted on, rated Bradley-Terry style.

    smolflow arena run                                      # the last 3 runs + promoted + base, offline judge
    smolflow arena run --artifacts-uri s3://bucket/smolflow --last-runs 7 --models '["my/model"]'

People vote on the same battles at the arena page: `smolflow arena serve` (tasks/arena_page.py).
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run

from tasks.arena_config import ArenaConfig
from tasks.arena_store import arena_store, write_answers, write_judge_battles, write_models
from tasks.arena_tasks import (
    ArenaModel,
    answer_prompts,
    gather_runs,
    judge_battles,
    load_prompts,
    log_wandb,
    publish_leaderboard,
    schedule_battles,
    unique_models,
)
from tasks.bookkeeping import begin_run
from tasks.caching import results_storage
from tasks.device import unpublish
from tasks.layout import new_run_id
from tasks.models import resolve_model
from tasks.runtime import run_logger, run_timeout


# unpublish: the arena's device and precision end with it (tasks/device.py).
@flow(name="smolflow-arena", result_storage=results_storage(), timeout_seconds=run_timeout(),
      on_completion=[unpublish], on_failure=[unpublish], on_crashed=[unpublish], on_cancellation=[unpublish])
def arena(config: ArenaConfig = ArenaConfig()) -> dict:
    """Models -> answers -> battles (most informative first) -> judge + people's votes -> ratings -> leaderboard."""
    _, placement = begin_run(config.torch_threads, config.execution, config.artifacts_uri)  # as the other flows
    run_logger().info("Models run on %s in %s (%s)", placement.device, placement.precision, placement.reason)
    prompts = load_prompts(config)  # the prompt file is checked before any model loads
    runs, run_base = gather_runs(config)
    if config.base_model == "auto" and run_base is not None:
        base = ArenaModel(name="base", ref=run_base)
    else:
        base = ArenaModel(name="base", ref=resolve_model("auto" if config.base_model == "auto" else config.base_model))
    extra = [ArenaModel(name=source, ref=resolve_model(source)) for source in config.models]
    models = unique_models([base, *runs, *extra])
    if len(models) < 2:
        raise ValueError(f"arena: only {len(models)} distinct model(s) (the base) under {config.artifacts_uri}; "
                         "complete a fine-tune run there or list more models in `models`")

    answers = {m.key: answer_prompts(m.ref, prompts, config.max_new_tokens) for m in models}
    store = arena_store(config.artifacts_uri)
    for key, rows in answers.items():
        write_answers(store, key, rows)
    write_models(store, [{"key": m.key, "name": m.name, **m.ref.model_dump()} for m in models], models[0].key, prompts)

    by_prompt = {key: {row["prompt"]: row["answer"] for row in rows} for key, rows in answers.items()}
    judged = []
    if config.judge.enabled:
        battles = schedule_battles(config.artifacts_uri, [m.key for m in models], prompts, config.max_battles)
        judged = judge_battles(battles, by_prompt, config.judge)
    write_judge_battles(store, judged)
    board = publish_leaderboard(config.artifacts_uri, config.human_votes, config.bootstrap_rounds, config.seed)
    run_id = new_run_id(f"arena-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}", flow_run.get_name())
    wandb_files = log_wandb(config, board, run_id, store)
    return {"leaderboard": board["files"], "verdict": board["verdict"], "wandb": wandb_files,
            "execution": placement.model_dump(include={"device", "precision", "reason"}),  # the decision, in words
            "rows": [{k: r[k] for k in ("rank", "name", "rating", "lower", "upper", "battles")} for r in board["rows"]]}
