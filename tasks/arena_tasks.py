"""The arena flow's stages: gather models, answer the prompts (cached), schedule and judge
battles, rate, publish. The rating math is in tasks/arena.py, the files in tasks/arena_store.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.arena import schedule
from tasks.arena_config import ArenaConfig, ArenaJudgeConfig
from tasks.arena_store import arena_store, current_board, model_key, read_judge_battles, read_votes, write_board
from tasks.caching import BY_CONTENT
from tasks.config import JudgeConfig
from tasks.models import ModelRef, load_model
from tasks.pointers import read_pointer
from tasks.runtime import cache_dir, retry_transient, run_logger
from tasks.storage import ArtifactStore, completed_runs, read_run

PREFERENCE_OUTCOME = {2.0: "a", 1.0: "b", 1.5: "tie"}  # tasks/judge.py: 2 = output (a's answer) better


class ArenaModel(BaseModel):
    """One contestant: a display name and the model it is."""

    name: str
    ref: ModelRef

    @property
    def key(self) -> str:
        return model_key(self.ref.fingerprint)


def load_prompts(cfg: ArenaConfig) -> list[str]:
    """The arena's prompts (AlpacaEval schema), checked, limited to cfg.limit."""
    from tasks.judge import load_instructions

    try:
        return load_instructions(JudgeConfig(instructions=cfg.prompts, limit=cfg.limit), [])
    except ValueError as err:  # the judge's reader names its own field; here the field is `prompts`
        raise ValueError(str(err).replace("judge.instructions", "arena prompts")) from None


def check_arena_inputs(cfg: ArenaConfig) -> None:
    """The prompt file and every model the user listed, found without loading a model: `smolflow arena run`
    calls it before the flow, so a typo costs a second and one line, not a Prefect server and a Failed run."""
    from tasks.checks import check_chat_template, check_model

    load_prompts(cfg)  # the flow's own reader: the same file:line message it would give
    # Every contestant answers the prompts through its chat template: one without it (a base model)
    # failed the flow once the others had answered, naming no setting.
    answer = "answer the arena's prompts; give a model with a chat template (an instruction-tuned one)"
    for i, source in enumerate(cfg.models):
        check_model(source, f"models[{i}]")
        check_chat_template(source, f"models[{i}]", answer)
    if cfg.base_model != "auto":
        check_model(cfg.base_model, "base_model")
        check_chat_template(cfg.base_model, "base_model", answer)
    judge = cfg.judge
    if judge.enabled and judge.backend == "local" and judge.model != "auto":  # as a run's judge (tasks/checks.py)
        check_model(judge.model, "judge.model")
        check_chat_template(judge.model, "judge.model", "read a judging prompt; use an instruction-tuned model "
                            "(e.g. judge.model: auto, the built-in SmolLM2-135M-Instruct)")


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[5, 30])
def gather_runs(cfg: ArenaConfig) -> tuple[list[ArenaModel], ModelRef | None]:
    """The promoted run and the newest N completed fine-tunes as contestants, and the newest one's base model."""
    # `smolflow eval` runs share the root; they trained nothing and have no base model.
    manifests = sorted((m for m in (read_run(cfg.artifacts_uri, run_id) for run_id in completed_runs(cfg.artifacts_uri))
                        if m.get("kind") != "eval"), key=lambda m: m.get("completed_at", ""))
    chosen = manifests[-cfg.last_runs:] if cfg.last_runs else []
    pointer = read_pointer(cfg.artifacts_uri, cfg.flow_name, "promoted") if cfg.promoted else None
    promoted = next((m for m in manifests if pointer and m["run_id"] == pointer["run_id"]), None)
    if promoted is not None and promoted not in chosen:
        chosen.insert(0, promoted)
    contestants = [ArenaModel(name=f"run {m['run_id']}" + (" (promoted)" if m is promoted else ""),
                              ref=ModelRef(**m["tuned_model"])) for m in chosen]
    base = ModelRef(**manifests[-1]["base_model"]) if manifests else None
    run_logger().info("Arena: %d completed runs under %s; %d chosen (promoted: %s)", len(manifests),
                      cfg.artifacts_uri, len(contestants), pointer["run_id"] if pointer else "none")
    return contestants, base


def unique_models(models: list[ArenaModel]) -> list[ArenaModel]:
    """One contestant per content fingerprint: the same weights under two names battle once."""
    seen: dict[str, ArenaModel] = {}
    for m in models:
        if m.key in seen:
            seen[m.key] = ArenaModel(name=f"{seen[m.key].name} = {m.name}", ref=seen[m.key].ref)
        else:
            seen[m.key] = m
    return list(seen.values())


def _answer_key(fingerprint: str, prompt: str, max_new_tokens: int) -> str:
    from tasks.code_version import computed_by
    from tasks.device import computed_as

    # How the model computed, off fp32 on the CPU (whose keys stay as they were): bf16 moves answers.
    how = computed_as()
    what = [fingerprint, prompt, max_new_tokens] + ([how] if how else []) + [computed_by("tasks.generation")]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


@task(cache_policy=BY_CONTENT, retries=1, retry_condition_fn=retry_transient)
def answer_prompts(model: ModelRef, prompts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
    """One model's greedy answers; each (model content, prompt, length) is generated once per machine."""
    from tasks.generation import generate

    # Prefect's cache keys the whole prompt list; this one keys each prompt, so adding a prompt to
    # the arena generates that prompt only.
    folder = cache_dir("arena-answers")
    paths = [folder / f"{_answer_key(model.fingerprint, p, max_new_tokens)}.json" for p in prompts]
    missing = [p for p, path in zip(prompts, paths) if not path.exists()]
    if missing:
        run_logger().info("Answering %d of %d prompts with %s", len(missing), len(prompts), model.source)
        lm, tokenizer = load_model(model)
        for sample in generate(lm.eval(), tokenizer, missing, max_new_tokens):
            path = folder / f"{_answer_key(model.fingerprint, sample.prompt, max_new_tokens)}.json"
            staging = path.with_suffix(".tmp")
            staging.write_text(json.dumps({"prompt": sample.prompt, "answer": sample.completion,
                                           "new_tokens": sample.new_tokens, "stopped_at_eos": sample.stopped_at_eos}),
                              encoding="utf-8")
            staging.replace(path)
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths]


@task(cache_policy=NO_CACHE)
def schedule_battles(root: str, keys: list[str], prompts: list[str], limit: int | None) -> list[tuple[str, str, str]]:
    """Battles to judge, the most informative first (closest ratings on the last leaderboard, fewest battles)."""
    store = arena_store(root)
    ratings = {}
    if store.exists("leaderboard.json"):
        ratings = {r["model"]: r["rating"] for r in store.read_json("leaderboard.json")["rows"]}
    played: dict[tuple[str, str], int] = {}
    for b in read_votes(store) + read_judge_battles(store):
        if b["model_a"] in keys and b["model_b"] in keys and b["model_a"] != b["model_b"]:
            pair = tuple(sorted((b["model_a"], b["model_b"]), key=keys.index))
            played[pair] = played.get(pair, 0) + 1
    return schedule(keys, prompts, ratings, played, limit)


@task(cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_transient, retry_delay_seconds=[10])
def judge_battles(battles: list[tuple[str, str, str]], answers: dict[str, dict[str, str]],
                  cfg: ArenaJudgeConfig) -> list[dict[str, Any]]:
    """Each battle judged in both orders by the fine-tune run's judge (cached verdicts reused)."""
    from tasks.judge import judge
    from tasks.judge_backends import make_backend

    if not battles:
        return []
    result = judge(make_backend(cfg), [p for _, _, p in battles],
                   [answers[a][p] for a, _, p in battles], [answers[b][p] for _, b, p in battles])
    out = []
    for (a, b, prompt), record in zip(battles, result.records):
        if record["preference"] is None:
            continue  # a verdict that named neither answer: left out, as in the judge's own win rate
        out.append({"model_a": a, "model_b": b, "prompt": prompt, "outcome": PREFERENCE_OUTCOME[record["preference"]],
                    "source": "judge", "judge": result.settings["judge_identity"],
                    "verdicts": [record["verdict_tuned_as_a"], record["verdict_tuned_as_b"]]})
    run_logger().info("Judge: %d battles, %d counted, %d left out (unparsed verdicts)",
                      len(battles), len(out), len(battles) - len(out))
    return out


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[5, 30])
def publish_leaderboard(root: str, human_votes: bool, rounds: int, seed: int) -> dict[str, Any]:
    """Fit the ratings, write leaderboard.json/.md/.png and show the table as a Prefect artifact."""
    store = arena_store(root)
    board = current_board(store, human_votes, rounds, seed)
    board["files"] = write_board(store, board)
    create_table_artifact(
        key="smolflow-arena",
        table=[{k: r[k] for k in ("rank", "name", "rating", "lower", "upper", "battles", "model")}
               for r in board["rows"]],
        description=f"Arena leaderboard (anchor {board['anchor']} = 1000; {board['judge_battles']} judge battles, "
                    f"{board['human_votes']} human votes). {board['verdict']}",
    )
    return board


def log_wandb(cfg: ArenaConfig, board: dict[str, Any], run_id: str, store: ArtifactStore) -> str | None:
    """The leaderboard as a W&B table (offline files by default), kept under arena/wandb/."""
    from tasks.tracking import finish_run, staging_inside, wandb_mode

    mode = wandb_mode(cfg.wandb)
    if mode == "disabled":
        return None
    import wandb

    local = cache_dir("work", run_id)
    wb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, id=run_id, name=run_id, group="arena",
                    job_type="arena", tags=["arena"], mode=mode, dir=str(local), config=cfg.model_dump(mode="json"),
                    reinit="finish_previous")
    table = wandb.Table(columns=["rank", "model", "key", "rating", "lower", "upper", "battles"])
    for r in board["rows"]:
        table.add_data(r["rank"], r["name"], r["model"], r["rating"], r["lower"], r["upper"], r["battles"])
    with staging_inside(wb):  # the table's file travels with the run (else W&B stages it in ~/.local/share)
        wb.log({"arena/leaderboard": table})
    wb.summary.update({f"arena/rating/{r['name']}": r["rating"] for r in board["rows"]}
                      | {"arena/judge_battles": board["judge_battles"], "arena/human_votes": board["human_votes"],
                         "arena/verdict": board["verdict"]})
    finish_run(wb, [])  # closed for good before its files are copied
    uploaded = store.upload_dir(Path(local) / "wandb", f"wandb/{run_id}")
    shutil.rmtree(local, ignore_errors=True)  # uploaded: nothing reads the local copy again
    keep_newest_wandb(store)
    return uploaded


WANDB_KEPT = 30  # arena runs whose W&B files stay under arena/wandb/ (one per nightly: a month)


def keep_newest_wandb(store: ArtifactStore, keep: int = WANDB_KEPT) -> list[str]:
    """Delete all but the newest `keep` arena runs' W&B folders (run ids start with their UTC time)."""
    runs = sorted({path.split("/", 1)[0] for path in store.list_files("wandb")})
    for run_id in runs[:-keep]:
        store.fs.rm(store._path(f"wandb/{run_id}"), recursive=True)
    return runs[:-keep]
