"""A benchmark measured another way than the promoted run's score (here its limit raised from 1 to 2
items) compared with nothing, and every later nightly was rejected until someone set
gate.allow_incomparable. Now the promoted model is scored again tonight's way and the gate compares
with that; gate.rescore_promoted: false keeps the old behaviour. Two tiny real flow runs, one root."""

import json
import shutil
from pathlib import Path

from flows.finetune import finetune
from tasks.config import GateConfig
from tasks.gate import promote, read_scores
from tasks.reference import rescore_promoted
from tasks.storage import ArtifactStore
from tests.conftest import tiny_run_config

TWO = [{"name": "gsm8k", "limit": 2, "batch_size": 2}]


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_promoted_model_is_scored_again_where_its_score_was_measured_another_way(tiny_model_dir, tmp_path):
    root = tmp_path / "root"

    def run(run_id: str, **overrides) -> dict:
        config = tiny_run_config(tiny_model_dir, str(root), output={"run_id": run_id}, judge={"enabled": False},
                                 wandb={"mode": "disabled"}, **overrides)
        return finetune(config=config)

    # Scored on 1 item, then promoted by hand (the tiny model's answers never stop, which the
    # health check blocks); a model of its own (2 steps), so scoring it again is real work.
    run("a", training={"max_steps": 2}, benchmarks=[{"name": "gsm8k", "limit": 1, "batch_size": 2}])
    promote.fn(str(root), "smolflow-finetune", "a")
    a = root / "runs" / "a" / "benchmarks" / "gsm8k"

    on = run("c", benchmarks=TWO)
    c = root / "runs" / "c"
    assert _json(c / "benchmarks" / "promoted.json") == {
        "run_id": "a", "run_uri": str(root / "runs" / "a"), "benchmarks": ["gsm8k"],
        "why": {"gsm8k": "different items, n 1 vs 2"}}
    again, tuned = _json(c / "benchmarks/gsm8k/promoted.summary.json"), _json(c / "benchmarks/gsm8k/tuned.summary.json")
    assert again["n"] == 2 and again["comparability_key"] == tuned["comparability_key"]
    # It is run a's model: on the item a scored, the same answer as a saved.
    old = {r["doc_id"]: r["output"] for r in _records(a / "tuned.jsonl")}
    new = {r["doc_id"]: r["output"] for r in _records(c / "benchmarks/gsm8k/promoted.jsonl")}
    assert len(old) == 1 and {k: new[k] for k in old} == old
    decision = _json(c / "gate" / "decision.json")
    assert decision["against"] == "promoted run a (its model scored again tonight on gsm8k)"
    (row,) = decision["table"]
    assert row["comparable"] == "yes" and row["reference"] == round(again["score"], 4)
    assert decision["not_comparable"] == [] and on["promoted"] == decision["promote"]
    assert "its model scored again tonight on gsm8k" in (c / "report" / "report.md").read_text(encoding="utf-8")

    # Off: nothing is scored again (the gate then lists the benchmark as not comparable, as before).
    scores = {"gsm8k": {"tuned": read_scores(ArtifactStore(str(c)), "tuned")["gsm8k"]}}
    assert rescore_promoted(str(root), "smolflow-finetune", str(c), GateConfig(rescore_promoted=False), scores, []) == []
    # On, with the promoted model deleted by hand: said, and the gate goes on without it (no failed run).
    shutil.rmtree(root / "runs" / "a" / "model")
    assert rescore_promoted(str(root), "smolflow-finetune", str(c), GateConfig(), scores, []) == []
