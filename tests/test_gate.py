"""Regression gate: promote, reject and first-run cases, on real run folders."""

from pathlib import Path

import pytest

from tasks.config import GateConfig
from tasks.gate import Score, decide, promote, regression_gate
from tasks.layout import RunPaths
from tasks.pointers import read_pointer
from tasks.storage import ArtifactStore, write_manifest

FLOW = "smolflow-finetune"


def test_no_drop_promotes():
    d = decide({"gsm8k": Score(score=0.30, stderr=0.05)}, {"gsm8k": Score(score=0.28, stderr=0.05)}, "base")
    assert d.promote and d.reasons == [] and d.table[0]["ok"]


def test_drop_within_noise_promotes_and_beyond_noise_rejects():
    ref = {"mmlu": Score(score=0.50, stderr=0.03)}
    # tolerance = 2 * sqrt(0.03^2 + 0.03^2) = 0.0849
    assert decide({"mmlu": Score(score=0.43, stderr=0.03)}, ref, "x").promote
    rejected = decide({"mmlu": Score(score=0.40, stderr=0.03)}, ref, "x")
    assert not rejected.promote
    assert "mmlu dropped 0.1000" in rejected.reasons[0] and "tolerance 0.0849" in rejected.reasons[0]


def test_a_gate_too_noisy_to_see_a_10_point_drop_says_so():
    """GSM8K at its default 10 items: a drop under ~0.3 is within noise. Promoted, but the decision
    says how large a drop it cannot see, and how to sharpen it; a fixed tolerance says nothing."""
    from tasks.gate import section

    d = decide({"gsm8k": Score(score=0.2, stderr=0.133, n=10)}, {"gsm8k": Score(score=0.3, stderr=0.153, n=10)}, "x")
    assert d.promote and d.weak == ["gsm8k: on 10 items a drop of up to 0.41 is within noise, so smaller regressions "
                                    "pass unseen; raise its benchmarks[].limit for a sharper gate"]
    assert "Weak evidence:\n\n- gsm8k: on 10 items" in section(d)
    sharp = decide({"mmlu": Score(score=0.5, stderr=0.01, n=2000)}, {"mmlu": Score(score=0.5, stderr=0.01, n=2000)}, "x")
    assert sharp.weak == [] and "Weak evidence" not in section(sharp)
    assert decide({"gsm8k": Score(score=0.2, stderr=0.133, n=10)}, {"gsm8k": Score(score=0.3, stderr=0.153, n=10)}, "x",
                  tolerance=0.05).weak == []


def test_fixed_tolerance_overrides_the_stderr_rule():
    ref = {"gsm8k": Score(score=0.50, stderr=0.2)}
    assert not decide({"gsm8k": Score(score=0.45, stderr=0.2)}, ref, "x", tolerance=0.01).promote


def test_blocking_health_sign_rejects_even_with_better_scores():
    d = decide({"gsm8k": Score(score=0.9)}, {"gsm8k": Score(score=0.1)}, "x", blocking_health=["overfitting from step 20"])
    assert not d.promote and d.reasons == ["training health: overfitting from step 20"]


def test_no_benchmarks_is_no_evidence_and_a_tolerance_for_them_is_refused():
    """benchmarks: [] gave an empty table and `promoted: true`; with nothing compared, only
    gate.allow_incomparable promotes, and a tolerance (for benchmark drops) has nothing to act on."""
    from tasks.config import RunConfig

    d = decide({}, {}, "base model")
    assert not d.promote and d.reasons[0].startswith("no benchmark was scored (benchmarks is empty)")
    assert decide({}, {}, "base model", allow_incomparable=True).promote
    with pytest.raises(ValueError, match=r"gate.tolerance: they act on benchmark scores"):
        RunConfig.model_validate({"benchmarks": [], "gate": {"tolerance": 0.05}})
    with pytest.raises(ValueError, match=r"gate.rescore_promoted: they act on benchmark scores"):  # accepted, did nothing
        RunConfig.model_validate({"benchmarks": [], "gate": {"rescore_promoted": False}})
    RunConfig.model_validate({"benchmarks": [], "gate": {"allow_incomparable": True}})
    # Custom benchmarks are gated too (custom/<name>): a tolerance for them was refused.
    capitals = str(Path(__file__).resolve().parents[1] / "tasks/fixtures/custom/capitals.jsonl")
    RunConfig.model_validate({"benchmarks": [], "custom_benchmarks": [capitals], "gate": {"tolerance": 0.05}})


def _completed_run(root, run_id: str, scores: dict[str, float], base: dict[str, float] | None = None) -> str:
    """A run folder holding saved scores where evaluation puts them (tuned, and base if given)."""
    run = ArtifactStore(root).child("runs", run_id)
    for role, values in (("tuned", scores), ("base", base or {})):
        for name, score in values.items():
            run.write_json(RunPaths.benchmark_summary(name, role), {"name": name, "score": score, "stderr": 0.01})
    run.write_json(RunPaths.comparison, [{"benchmark": name} for name in scores])
    write_manifest(run.uri, {"run_id": run_id})
    return run.uri


def test_first_run_compares_with_the_base_model_and_promotes(tmp_path):
    root = str(tmp_path)
    run_uri = _completed_run(root, "r1", {"gsm8k": 0.2}, base={"gsm8k": 0.1})
    d = regression_gate.fn(root, FLOW, run_uri, GateConfig(), [])
    assert d.promote and d.against.startswith("base model")
    assert ArtifactStore(run_uri).read_json("gate/decision.json")["promote"] is True
    promote.fn(root, FLOW, "r1")
    assert read_pointer(root, FLOW, "promoted")["run_id"] == "r1"


def test_regression_against_the_promoted_run_is_rejected_and_the_model_kept(tmp_path):
    root = str(tmp_path)
    _completed_run(root, "good", {"gsm8k": 0.40})
    promote.fn(root, FLOW, "good")
    worse = _completed_run(root, "worse", {"gsm8k": 0.10}, base={"gsm8k": 0.5})
    ArtifactStore(worse).write_text("model/model.safetensors", "weights")
    d = regression_gate.fn(root, FLOW, worse, GateConfig(), [])
    assert not d.promote and d.against == "promoted run good"
    assert "gsm8k dropped 0.3000" in d.reasons[0]
    assert read_pointer(root, FLOW, "promoted")["run_id"] == "good"  # unchanged
    assert ArtifactStore(worse).exists("model/model.safetensors")  # rejected, not deleted
    assert "Not promoted" in (tmp_path / "runs/worse/gate/decision.md").read_text()


def test_promoting_an_incomplete_run_is_refused(tmp_path):
    ArtifactStore(str(tmp_path)).child("runs", "half").write_json("config.json", {})
    with pytest.raises(FileNotFoundError):
        promote.fn(str(tmp_path), FLOW, "half")


def test_gate_off_never_promotes_and_says_so(tmp_path):
    root = str(tmp_path)
    run_uri = _completed_run(root, "r1", {"gsm8k": 0.9}, base={"gsm8k": 0.1})
    d = regression_gate.fn(root, FLOW, run_uri, GateConfig(enabled=False), [])
    assert not d.promote and "gate.enabled: false" in d.reasons[-1]
    assert "gate.enabled: false" in ArtifactStore(run_uri).read_text(RunPaths.section("gate"))


def _records(correct: list[bool]) -> str:
    return "".join(f'{{"doc_id": {i}, "correct": {str(c).lower()}}}\n' for i, c in enumerate(correct))


def test_the_same_items_are_compared_item_by_item(tmp_path):
    """0.60 -> 0.50 on the same 100 items, 10 lost and none gained: as two independent scores the
    allowed drop is 0.14 and the model passed; item by item the difference's stderr is 0.03, a
    regression. Read from the run folders' per-item records, as a nightly does."""
    import math

    root = str(tmp_path)
    base = [i < 60 for i in range(100)]
    tuned = [i < 50 for i in range(100)]
    stderr = lambda v: math.sqrt(sum(v) / len(v) * (1 - sum(v) / len(v)) / (len(v) - 1))  # noqa: E731
    run = ArtifactStore(root).child("runs", "r1")
    for role, values in (("base", base), ("tuned", tuned)):
        run.write_json(RunPaths.benchmark_summary("mmlu", role), {"name": "mmlu", "score": sum(values) / 100,
                                                                  "stderr": stderr(values), "n": 100})
        run.write_text(RunPaths.benchmark_records("mmlu", role), _records(values))
    run.write_json(RunPaths.comparison, [{"benchmark": "mmlu"}])
    independent = decide({"mmlu": Score(score=0.5, stderr=stderr(tuned), n=100)},
                         {"mmlu": Score(score=0.6, stderr=stderr(base), n=100)}, "x")
    assert independent.promote and independent.table[0]["tolerance"] == 0.1407
    d = regression_gate.fn(root, FLOW, run.uri, GateConfig(), [])
    assert not d.promote and d.table[0]["noise"] == "paired" and d.table[0]["stderr"] == 0.0302
    assert d.reasons == ["mmlu dropped 0.1000 (from 0.6000 to 0.5000), more than its tolerance 0.0603"]


def test_models_that_agree_on_every_item_are_not_noise_free(tmp_path):
    """Both models right on 1 of 3 GSM8K items, the same one: the per-item differences have no spread,
    and the allowed drop was 0.0 with no "Weak evidence". Three items cannot show that; the error is
    that of one item in n having differed, so 3 items are weak evidence and 300 are not."""
    root = str(tmp_path)
    for n, values in ((3, [True, False, False]), (300, [i < 100 for i in range(300)])):
        run = ArtifactStore(root).child("runs", f"r{n}")
        for role in ("base", "tuned"):
            run.write_json(RunPaths.benchmark_summary("gsm8k", role), {"name": "gsm8k", "score": sum(values) / n,
                                                                       "stderr": 0.1, "n": n})
            run.write_text(RunPaths.benchmark_records("gsm8k", role), _records(values))
        run.write_json(RunPaths.comparison, [{"benchmark": "gsm8k"}])
        d = regression_gate.fn(root, FLOW, run.uri, GateConfig(), [])
        assert d.promote and d.table[0]["noise"] == "paired"
        assert d.table[0]["stderr"] == round(1 / n, 4) and d.table[0]["tolerance"] == round(2 / n, 4)
        assert d.weak == ([] if n == 300 else ["gsm8k: on 3 items a drop of up to 0.67 is within noise, so smaller "
                                               "regressions pass unseen; raise its benchmarks[].limit for a sharper gate"])


def test_no_stderr_is_unknown_noise_not_none():
    """One item each: no standard error. Any drop counts, and the decision says the evidence is weak."""
    d = decide({"custom/capitals": Score(score=0.0, n=1)}, {"custom/capitals": Score(score=1.0, n=1)}, "x")
    assert not d.promote and d.table[0]["noise"] == "unknown" and d.table[0]["stderr"] is None
    assert d.weak == ["custom/capitals: on 1 item(s) there is no standard error, so any drop counts as a regression "
                      "and no gain is evidence; add items to its file for a real gate"]


def test_a_benchmark_the_promoted_run_has_but_tonight_lacks_is_named(tmp_path):
    root = str(tmp_path)
    _completed_run(root, "good", {"gsm8k": 0.40, "mmlu": 0.5})
    promote.fn(root, FLOW, "good")
    tonight = _completed_run(root, "tonight", {"gsm8k": 0.40}, base={"gsm8k": 0.3})
    d = regression_gate.fn(root, FLOW, tonight, GateConfig(), [])
    assert d.promote and d.not_comparable == ["mmlu: not scored tonight (the promoted run good has it)"]
    assert "- mmlu: not scored tonight (the promoted run good has it) - not evidence either way" in \
        (tmp_path / "runs/tonight/gate/decision.md").read_text()
