"""The promoted model scored again tonight where its saved scores were measured another way.

The gate compares only scores with equal comparability keys (tasks/benchmarks/provenance.py). After
an upgrade that changes how a benchmark is computed, a change of its settings (limit, shots,
precision) or a night on another kind of machine, the promoted run's saved scores compare with
nothing tonight, and every nightly was rejected ("no benchmark score is comparable") until someone
set gate.allow_incomparable. Instead (gate.rescore_promoted), the promoted model, kept in its run
folder (retention never deletes it), is scored again on those benchmarks with tonight's code and
settings: the gate compares with that (tasks/gate.py reference_scores). The scores are this run's
files (`benchmarks/<name>/promoted.*`, and `benchmarks/promoted.json` naming the run), so the report
and the manifest say what the reference was.
"""

from __future__ import annotations

from tasks.benchmarks.base import BenchmarkResult
from tasks.config import BenchmarkConfig, GateConfig, JudgeConfig
from tasks.evaluation import save_result, score_models
from tasks.gate import Score, comparable, read_scores
from tasks.layout import RunPaths
from tasks.models import ModelRef
from tasks.pointers import read_pointer
from tasks.runtime import run_logger
from tasks.storage import ArtifactStore
from tasks.transfer import model_exists

ROLE = "promoted"


def rescore_promoted(root: str, flow_name: str, run_uri: str, gate: GateConfig,
                     scores: dict[str, dict[str, BenchmarkResult]], benchmarks: list[BenchmarkConfig],
                     custom: list = (), judge: JudgeConfig | None = None) -> list[str]:
    """Score the promoted model tonight on each benchmark whose saved score it cannot be compared
    with; the benchmarks scored (none: nothing promoted, all comparable, or the gate off)."""
    pointer = read_pointer(root, flow_name, "promoted")
    if pointer is None or not gate.enabled or not gate.rescore_promoted:
        return []
    promoted = ArtifactStore(pointer["run_uri"])
    theirs = read_scores(promoted, "tuned", list(scores))
    why = {name: reason for name, pair in scores.items() if name in theirs and "tuned" in pair
           and (reason := comparable(theirs[name], Score.of(pair["tuned"]))) is not None}
    if not why:
        return []
    log = run_logger()
    model = promoted.read_json(RunPaths.manifest).get("tuned_model")
    if model is None or not model_exists(model["path"]):  # before the manifest named it; deleted by hand
        log.warning("Promoted run %s's model is not in its run folder, so it cannot be scored again: %s not "
                    "compared", pointer["run_id"], ", ".join(why))
        return []
    for name, reason in why.items():
        log.info("Promoted run %s's %s was measured another way (%s): scoring its model again tonight",
                 pointer["run_id"], name, reason)
    again = score_models({ROLE: ModelRef.model_validate(model)}, [b for b in benchmarks if b.name in why],
                         [b for b in custom if f"custom/{b.name}" in why], judge)
    run = ArtifactStore(run_uri)
    for name, by_role in again.items():
        save_result(run, name, ROLE, by_role[ROLE])
    run.write_json(RunPaths.promoted_rescored, {"run_id": pointer["run_id"], "run_uri": pointer["run_uri"],
                                                "benchmarks": sorted(again), "why": why})
    return sorted(again)
