"""Regression gate: promote tonight's tuned model only if no benchmark dropped beyond its
tolerance against the last promoted model (on the first run: against the base model) and the
training-health check raised no blocking sign. A rejected model stays in its run folder."""

from __future__ import annotations

import math
import posixpath
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.locks import PROMOTION_LOCK, exclusive
from tasks.runtime import retry_transient, run_logger
from tasks.storage import ArtifactStore, read_pointer, set_pointer


class Score(BaseModel):
    score: float
    stderr: float | None = None


class GateDecision(BaseModel):
    promote: bool
    against: str  # "base model" or "promoted run <id>"
    reasons: list[str]  # why not promoted; empty when promoted
    table: list[dict]  # per benchmark: reference, tuned, delta, tolerance, ok
    reference_run: str | None = None  # the promoted run compared with (None: the base model)


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


REJECTED_EVENT = "smolflow.promotion.rejected"  # what an alert automation matches (deployments/alerts.py)


def reference_scores(
    root: str, flow_name: str, names, base: dict[str, Score],
) -> tuple[dict[str, Score], str, str | None]:
    """Read `promoted` now: (its tuned scores, "against" text, its run id); the base model's when unset."""
    pointer = read_pointer(root, flow_name, "promoted")
    if pointer is None:
        return base, "base model (first run: nothing promoted yet)", None
    promoted = ArtifactStore(pointer["run_uri"])
    reference = {
        name: Score(**promoted.read_json(f"benchmarks/{name}/tuned.summary.json"))
        for name in names
        if promoted.exists(f"benchmarks/{name}/tuned.summary.json")
    }
    return reference, f"promoted run {pointer['run_id']}", pointer["run_id"]


def emit_rejection(flow_name: str, run_id: str, decision: GateDecision) -> None:
    """A Prefect event for a rejected model, which an automation can turn into a notification."""
    from prefect.events import emit_event

    emit_event(
        event=REJECTED_EVENT,
        resource={"prefect.resource.id": f"smolflow.run.{run_id}", "prefect.resource.name": run_id,
                  "smolflow.flow": flow_name},
        payload={"against": decision.against, "reasons": decision.reasons},
    )


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[5, 30])
def regression_gate(
    root: str, flow_name: str, run_uri: str, base: dict[str, Any], tuned: dict[str, Any],
    tolerance: float | None, blocking_health: list[str],
) -> GateDecision:
    """Compare with the promoted run (or the base model), and write the decision to the run folder."""
    # Scores arrive as BenchmarkResults (or anything with .score/.stderr); only those two count.
    base = {n: Score(score=r.score, stderr=r.stderr) for n, r in base.items()}
    tuned = {n: Score(score=r.score, stderr=r.stderr) for n, r in tuned.items()}
    reference, against, reference_run = reference_scores(root, flow_name, tuned, base)
    decision = decide(tuned, reference, against, tolerance, blocking_health)
    decision.reference_run = reference_run
    run = ArtifactStore(run_uri)
    run.write_json("gate/decision.json", decision.model_dump())
    run.write_text("gate/decision.md", markdown(decision))
    create_markdown_artifact(key="smolflow-gate", markdown=markdown(decision), description="Promotion decision")
    if not decision.promote:
        emit_rejection(flow_name, posixpath.basename(run_uri.rstrip("/")), decision)
    return decision


@task(cache_policy=NO_CACHE, retries=3, retry_condition_fn=retry_transient, retry_delay_seconds=[2, 10, 30])
def promote(root: str, flow_name: str, run_id: str, decision: GateDecision | None = None,
            tolerance: float | None = None) -> str | None:
    """Move the flow's `promoted` pointer to this run (after its manifest is written), compare-and-swap:
    if another run was promoted since this run's gate, compare with that one first. None: rejected."""
    with exclusive(PROMOTION_LOCK, f"promote {run_id}"):
        current = read_pointer(root, flow_name, "promoted")
        if decision is not None and (current["run_id"] if current else None) != decision.reference_run:
            # Two runs finishing together both passed a gate against the same old reference:
            # the later one must beat the one promoted in between, not the older reference.
            run = ArtifactStore(root).child("runs", run_id)
            tuned = {row["benchmark"]: Score(**run.read_json(f"benchmarks/{row['benchmark']}/tuned.summary.json"))
                     for row in decision.table}
            reference, against, reference_run = reference_scores(root, flow_name, tuned, {})
            recheck = decide(tuned, reference, against, tolerance)
            recheck.reference_run = reference_run
            run_logger().info("Promotion re-check against %s: %s", against,
                              "pass" if recheck.promote else recheck.reasons)
            if not recheck.promote:
                create_markdown_artifact(key="smolflow-gate", markdown=markdown(recheck),
                                         description="Promotion decision (re-checked at promotion)")
                emit_rejection(flow_name, run_id, recheck)
                return None
        return set_pointer(root, flow_name, "promoted", run_id)
