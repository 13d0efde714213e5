"""The arena flow end to end on tiny models: completed runs and the promoted pointer gathered,
answers cached, battles judged by the real built-in judge, people's votes counted, leaderboard
files, a Prefect table artifact and an offline W&B table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.arena import arena
from tasks.arena_config import ArenaConfig
from tasks.arena_store import append_vote, arena_store, read_votes
from tasks.arena_tasks import gather_runs
from tasks.config import DeviceConfig
from tasks.device import ENV
from tasks.models import ModelRef, fingerprint_dir, resolve_model
from tasks.pointers import set_pointer
from tasks.runtime import cache_dir
from tasks.storage import ArtifactStore, write_manifest
from tests.conftest import _tiny_llama
from tests.test_flow import _task_states

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, run_id: str, model_dir: Path, base: ModelRef, completed_at: str) -> ModelRef:
    """A completed fine-tune run folder as the finetune flow leaves it: model/ and a manifest."""
    run = ArtifactStore(str(root)).child("runs", run_id)
    run.upload_dir(model_dir, "model")
    tuned = ModelRef(source=str(model_dir), path=run.url("model"), fingerprint=fingerprint_dir(model_dir))
    write_manifest(run.uri, {"run_id": run_id, "base_model": base.model_dump(), "tuned_model": tuned.model_dump(),
                                "completed_at": completed_at})
    return tuned


@pytest.fixture
def tiny_models(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [_tiny_llama(tokenizer, tmp_path / f"tiny-{seed}", seed=seed) for seed in (1, 2, 3)]


def test_arena_flow_end_to_end_with_votes_and_cache(tiny_model_dir, tiny_models, builtin_dir, tmp_path):
    # Over 20 s: two flow runs, the real 135M judge and an offline W&B run (155 s measured while
    # other agents loaded this 2-core machine to a load average of 14). The arena's one end-to-end test.
    root = tmp_path / "artifacts"
    base = resolve_model.fn(str(tiny_model_dir))
    make_run(root, "r1", tiny_models[0], base, "2026-11-30T02:30:00+00:00")
    make_run(root, "r2", tiny_models[1], base, "2026-12-01T02:30:00+00:00")
    ArtifactStore(str(root)).child("runs", "r3").write_json("config.json", {})  # incomplete: no manifest
    set_pointer(str(root), "smolflow-finetune", "promoted", "r1")
    config = ArenaConfig(artifacts_uri=str(root), last_runs=1, models=[str(tiny_models[2])], limit=2, max_new_tokens=4,
                         max_battles=3, bootstrap_rounds=20, wandb={"mode": "offline"}, torch_threads=1)

    state = arena(config=config, return_state=True)
    result = state.result()
    names = {r["name"] for r in result["rows"]}
    assert names == {"base", "run r1 (promoted)", "run r2", str(tiny_models[2])}  # r1 promoted, r2 newest, no r3
    store = arena_store(str(root))
    meta = store.read_json("models.json")
    keys = {m["name"]: m["key"] for m in meta["models"]}
    assert meta["anchor"] == keys["base"] == base.fingerprint[:12] and len(meta["prompts"]) == 2
    for key in keys.values():
        answers = [json.loads(line) for line in (root / f"arena/answers/{key}.jsonl").read_text().splitlines()]
        assert [a["prompt"] for a in answers] == meta["prompts"] and all(a["new_tokens"] <= 4 for a in answers)
    judged = [json.loads(line) for line in (root / "arena/battles/judge.jsonl").read_text().splitlines()]
    assert 1 <= len(judged) <= 3 and all(b["outcome"] in ("a", "b", "tie") and b["source"] == "judge" for b in judged)
    assert all(b["judge"].startswith("local:") and len(b["verdicts"]) == 2 for b in judged)
    board = store.read_json("leaderboard.json")
    assert board["judge_battles"] == len(judged) and board["human_votes"] == 0
    assert next(r for r in board["rows"] if r["name"] == "base")["rating"] == 1000.0
    assert (root / "arena/leaderboard.png").read_bytes().startswith(PNG)
    assert board["verdict"] in (root / "arena/leaderboard.md").read_text()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (table,) = [json.loads(a.data) for a in found if a.key == "smolflow-arena"]
    assert {row["name"] for row in table} == names
    (offline,) = (root / "arena/wandb").glob("*/offline-run-*")
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json",
                          str(offline)], capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(out.stdout)["summary"]
    assert summary["arena/human_votes"] == 0 and summary["arena/rating/base"] == 1000.0
    assert "arena/leaderboard" in summary  # the table
    # ... whose file is staged inside the run's W&B folder, so it syncs from there (it was left in
    # ~/.local/share/wandb/artifacts/staging, one file an arena run, and missing from the folder).
    assert any(b'"rank"' in p.read_bytes() for p in offline.glob("staging/**/*") if p.is_file())
    assert not (cache_dir("work") / offline.parent.name).exists()  # uploaded, then the local copy goes

    # People prefer the extra model over the base four times: the next run counts it, from cache.
    extra = keys[str(tiny_models[2])]
    for _ in range(4):
        append_vote(store, {"prompt": meta["prompts"][0], "model_a": extra, "model_b": keys["base"], "outcome": "a"})
    assert len(read_votes(store)) == 4
    before = next(r["rating"] for r in result["rows"] if r["name"] == str(tiny_models[2]))
    state = arena(config=config.model_copy(update={"wandb": config.wandb.model_copy(update={"mode": "disabled"})}),
                  return_state=True)
    again = state.result()
    after = next(r["rating"] for r in again["rows"] if r["name"] == str(tiny_models[2]))
    assert store.read_json("leaderboard.json")["human_votes"] == 4 and after > before + 50
    assert _task_states(state.state_details.flow_run_id)["answer_prompts"] == {"Cached"}
    assert again["execution"]["device"] == "cpu" and again["execution"]["precision"] in ("fp32", "bf16")

    # Its execution settings apply (the arena once ran every model on the CPU in fp32 whatever the
    # machine): in bf16 the contestants answer again, as bf16 answers are not fp32 ones.
    state = arena(config=config.model_copy(update={"wandb": config.wandb.model_copy(update={"mode": "disabled"}),
                                                    "judge": config.judge.model_copy(update={"enabled": False}),
                                                    "execution": DeviceConfig(precision="bf16")}), return_state=True)
    assert state.result()["execution"]["precision"] == "bf16"
    if again["execution"]["precision"] == "fp32":  # `auto` picked fp32 on this CPU: bf16 is another computation
        assert _task_states(state.state_details.flow_run_id)["answer_prompts"] == {"Completed"}
    assert not os.environ.get(ENV)  # the arena's placement ended with it
    with pytest.raises(ValueError, match="task_runner"):  # no benchmarks to spread over Ray: not a setting here
        ArenaConfig(execution={"task_runner": "ray"})


def test_eval_runs_in_the_root_are_not_contestants(tiny_model_dir, tiny_models, tmp_path):
    """`smolflow eval` writes its runs into the same root (kind eval, no base model): the newest run
    being one must not break the arena, nor make it a contestant."""
    root = tmp_path / "artifacts"
    base = resolve_model.fn(str(tiny_model_dir))
    make_run(root, "r1", tiny_models[0], base, "2026-11-30T02:30:00+00:00")
    evaluated = ArtifactStore(str(root)).child("runs", "eval-1")
    write_manifest(evaluated.uri, {"run_id": "eval-1", "kind": "eval", "completed_at": "2026-12-01T02:30:00+00:00",
                                      "tuned_model": base.model_dump()})
    contestants, newest_base = gather_runs.fn(ArenaConfig(artifacts_uri=str(root), last_runs=3))
    assert [c.name for c in contestants] == ["run r1"]
    assert newest_base == base


def test_bad_prompt_file_is_named_before_any_model_loads(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"instruction": ""}\n')
    with pytest.raises(ValueError, match=r"arena prompts: .*prompts.jsonl line 2 has no non-empty `instruction`"):
        arena(config=ArenaConfig(artifacts_uri=str(tmp_path / "none"), prompts=str(bad), torch_threads=1))
    with pytest.raises(ValueError, match="unsupported scheme"):
        ArenaConfig(artifacts_uri="http://example.com/x")
    with pytest.raises(ValueError, match="judge.model: judge.enabled is false, so the judge does not run"):
        ArenaConfig(judge={"enabled": False, "model": "HuggingFaceTB/SmolLM2-360M-Instruct"})


def test_only_the_newest_arena_wandb_folders_stay(tmp_path):
    from tasks.arena_tasks import keep_newest_wandb

    store = ArtifactStore(str(tmp_path))
    runs = [f"arena-20261201-02{m:02d}00-run" for m in range(5)]
    for run_id in runs:
        store.write_text(f"wandb/{run_id}/offline-run-x/run.wandb", "x")
    assert keep_newest_wandb(store, keep=3) == runs[:2]
    assert sorted(p.name for p in (tmp_path / "wandb").iterdir()) == runs[2:]
