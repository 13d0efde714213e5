"""Regression gate: promote tonight's tuned model only if no benchmark dropped beyond its
tolerance against the last promoted model (on the first run: against the base model) and the
training-health check raised no blocking sign. A rejected model stays in its run folder."""

from __future__ import annotations

import math
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.storage import ArtifactStore, read_pointer, set_pointer


class Score(BaseModel):
    score: float
    stderr: float | None = None


class GateDecision(BaseModel):
    promote: bool
    against: str  # "base model" or "promoted run <id>"
    reasons: list[str]  # why not promoted; empty when promoted
    table: list[dict]  # per benchmark: reference, tuned, delta, tolerance, ok


def tolerance_for(reference: Score, tuned: Score, fixed: float | None) -> float:
    """An allowed drop: the fixed one if given, else twice the two scores' combined stderr."""
    if fixed is not None:
        return fixed
    return 2 * math.sqrt((reference.stderr or 0) ** 2 + (tuned.stderr or 0) ** 2)


def decide(
    tuned: dict[str, Score], reference: dict[str, Score], against: str,
    tolerance: float | None = None, blocking_health: list[str] | None = None,
) -> GateDecision:
    """The gate's verdict from scores alone (pure: the tests drive it directly)."""
    table, reasons = [], []
    for name, new in sorted(tuned.items()):
        ref = reference.get(name)
        if ref is None:  # a newly added benchmark has nothing to regress against
            table.append({"benchmark": name, "reference": None, "tuned": new.score, "delta": None, "tolerance": None, "ok": True})
            continue
        delta, allowed = new.score - ref.score, tolerance_for(ref, new, tolerance)
        ok = delta >= -allowed
        table.append({"benchmark": name, "reference": round(ref.score, 4), "tuned": round(new.score, 4),
                      "delta": round(delta, 4), "tolerance": round(allowed, 4), "ok": ok})
        if not ok:
            reasons.append(f"{name} dropped {-delta:.4f} (from {ref.score:.4f} to {new.score:.4f}), more than its tolerance {allowed:.4f}")
    reasons += [f"training health: {sign}" for sign in blocking_health or []]
    return GateDecision(promote=not reasons, against=against, reasons=reasons, table=table)


def markdown(decision: GateDecision) -> str:
    verdict = "**Promoted**" if decision.promote else "**Not promoted** (the model is kept in its run folder)"
    rows = "".join(
        f"| {r['benchmark']} | {r['reference']} | {r['tuned']} | {r['delta']} | {r['tolerance']} | {'ok' if r['ok'] else 'REGRESSION'} |\n"
        for r in decision.table
    )
    why = "".join(f"- {reason}\n" for reason in decision.reasons)
    return (f"# Regression gate\n\n{verdict}, compared with the {decision.against}.\n\n{why}\n"
            f"| benchmark | reference | tuned | delta | tolerance | |\n|---|---|---|---|---|---|\n{rows}")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def regression_gate(
    root: str, flow_name: str, run_uri: str, base: dict[str, Any], tuned: dict[str, Any],
    tolerance: float | None, blocking_health: list[str],
) -> GateDecision:
    """Compare with the promoted run (or the base model), and write the decision to the run folder."""
    # Scores arrive as BenchmarkResults (or anything with .score/.stderr); only those two count.
    base = {n: Score(score=r.score, stderr=r.stderr) for n, r in base.items()}
    tuned = {n: Score(score=r.score, stderr=r.stderr) for n, r in tuned.items()}
    pointer = read_pointer(root, flow_name, "promoted")
    if pointer is None:
        reference, against = base, "base model (first run: nothing promoted yet)"
    else:
        promoted = ArtifactStore(pointer["run_uri"])
        reference = {
            name: Score(**promoted.read_json(f"benchmarks/{name}/tuned.summary.json"))
            for name in tuned
            if promoted.exists(f"benchmarks/{name}/tuned.summary.json")
        }
        against = f"promoted run {pointer['run_id']}"
    decision = decide(tuned, reference, against, tolerance, blocking_health)
    run = ArtifactStore(run_uri)
    run.write_json("gate/decision.json", decision.model_dump())
    run.write_text("gate/decision.md", markdown(decision))
    create_markdown_artifact(key="smolflow-gate", markdown=markdown(decision), description="Promotion decision")
    return decision


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30])
def promote(root: str, flow_name: str, run_id: str) -> str:
    """Move the flow's `promoted` pointer to this run (after its manifest is written)."""
    return set_pointer(root, flow_name, "promoted", run_id)
