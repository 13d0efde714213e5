"""`smolflow promote RUN_ID --reason ...`: a person rolls the `promoted` pointer back (or forward) to a
completed fine-tuning run; the next night's gate compares with that run and says who chose it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.gate import reference_scores
from tasks.pointers import read_pointer, set_pointer
from tasks.storage import ArtifactStore, write_manifest

SMOLFLOW = str(Path(sys.executable).parent / "smolflow")
FLOW = "smolflow-finetune"


def _run(root, run_id: str, score: float | None, *, complete=True, model=True, kind=None) -> None:
    """A run folder as a flow leaves it: config, the tuned model's config and gsm8k score, manifest last."""
    run = ArtifactStore(str(root)).child("runs", run_id)
    run.write_json("config.json", {"output": {"keep_runs": 14}})
    if model:
        run.write_json("model/config.json", {"model_type": "llama"})
    if score is not None:
        run.write_json("benchmarks/comparison.json", [{"benchmark": "gsm8k", "base": 0.25, "tuned": score}])
        run.write_json("benchmarks/gsm8k/tuned.summary.json", {"score": score, "stderr": 0.05, "n": 100,
                                                               "comparability_key": "k"})
    if complete:
        write_manifest(run.uri, {"run_id": run_id, **({"kind": kind} if kind else {})})


def _promote(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SMOLFLOW, "promote", *args, "--root", str(root)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_promoted_by_hand_is_what_the_next_gate_compares_with(where, tmp_path, request):
    # n1 was promoted by its gate; n2 was rejected (a spurious format sign, say) and is rolled forward to.
    # On a SeaweedFS bucket the pointer moves by a conditional PUT.
    root = str(tmp_path) if where == "local" else f"{request.getfixturevalue('s3_bucket')}/smolflow"
    _run(root, "20261206-020000-n1", 0.30)
    _run(root, "20261207-020000-n2", 0.28)
    set_pointer(root, FLOW, "promoted", "20261206-020000-n1")
    done = _promote(root, "20261207-020000-n2", "--reason", "format sign was spurious (answers end at EOS)")
    assert done.returncode == 0, done.stderr
    assert "promoted: 20261207-020000-n2 (by hand: format sign was spurious" in done.stdout
    assert "before: 20261206-020000-n1" in done.stdout, done.stdout
    pointer = read_pointer(root, FLOW, "promoted")
    assert pointer["run_id"] == "20261207-020000-n2" and pointer["by_hand"]["before"] == "20261206-020000-n1"
    assert pointer["by_hand"]["reason"] == "format sign was spurious (answers end at EOS)" and "@" in pointer["by_hand"]["by"]
    # The next night's gate compares with n2's scores and names who chose it.
    scores, against, reference_run = reference_scores(root, FLOW, ["gsm8k"], None)
    assert reference_run == "20261207-020000-n2" and scores["gsm8k"].score == 0.28
    assert against.startswith("promoted run 20261207-020000-n2 (promoted by hand by ") and "spurious" in against
    # `smolflow runs` shows it, and `--json` says which run was promoted by hand.
    shown = subprocess.run([SMOLFLOW, "runs", "--root", root], capture_output=True, text=True, timeout=120)
    column = shown.stdout.splitlines()[0].index("promoted")
    promoted = {line.split()[0]: line[column:].split("  ")[0] for line in shown.stdout.splitlines()[2:]}
    assert promoted["20261207-020000-n2"].startswith("yes (now, by hand: format sign was spurious"), shown.stdout
    listed = json.loads(subprocess.run([SMOLFLOW, "runs", "--json", "--root", root],
                                       capture_output=True, text=True, timeout=120).stdout)
    assert {r["run_id"]: r["by_hand"] is not None for r in listed} == {"20261206-020000-n1": False,
                                                                         "20261207-020000-n2": True}
    # Rolled back to n1: the pointer names it, and says it was n2 before.
    back = _promote(root, "20261206-020000-n1", "--reason", "roll back")
    assert back.returncode == 0 and read_pointer(root, FLOW, "promoted")["by_hand"]["before"] == "20261207-020000-n2"
    again = _promote(root, "20261206-020000-n1", "--reason", "roll back")
    assert again.returncode == 0 and "already the promoted run" in again.stdout, again.stdout


def test_only_a_completed_run_with_a_tuned_model_can_be_promoted(tmp_path):
    _run(tmp_path, "20261206-020000-n1", 0.30)
    set_pointer(str(tmp_path), FLOW, "promoted", "20261206-020000-n1")
    _run(tmp_path, "20261207-020000-stopped", None, complete=False)
    _run(tmp_path, "eval-20261207-030000-e1", 0.25, model=False, kind="eval")
    for run_id, says in (("20261207-020000-stopped", "did not complete (no manifest.json)"),
                         ("eval-20261207-030000-e1", "holds no tuned model"),
                         ("20261207-020000-typo", "no run '20261207-020000-typo' under"),
                         ("../runs/20261206-020000-n1", "no run '../runs/20261206-020000-n1' under")):
        refused = _promote(tmp_path, run_id, "--reason", "x")
        assert refused.returncode == 2 and refused.stderr.startswith(f"smolflow promote: error: ") and says in refused.stderr, \
            (run_id, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert read_pointer(str(tmp_path), FLOW, "promoted")["run_id"] == "20261206-020000-n1"  # nothing moved
    needs_reason = _promote(tmp_path, "20261206-020000-n1")
    assert needs_reason.returncode == 2 and "--reason" in needs_reason.stderr
