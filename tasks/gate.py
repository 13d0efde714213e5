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
    n: int | None = None
    # Equal keys: same data, items, n-shot, format, template, generation and scorer (provenance.py).
    # Scores built without one (older runs, hand-made) compare only with each other.
    comparability_key: str | None = None
    comparability: dict[str, Any] | None = None

    @classmethod
    def of(cls, result: Any) -> Score:
        """From a BenchmarkResult (or anything with .score/.stderr and optionally the key)."""
        return cls(score=result.score, stderr=result.stderr, n=getattr(result, "n", None),
                   comparability_key=getattr(result, "comparability_key", None),
                   comparability=getattr(result, "comparability", None) or None)


class GateDecision(BaseModel):
    promote: bool
    against: str  # "base model" or "promoted run <id>"
    reasons: list[str]  # why not promoted; empty when promoted
    table: list[dict]  # per benchmark: reference, tuned, delta, tolerance, ok (and why not comparable)
    not_comparable: list[str] = []  # "<benchmark>: not comparable (why)": listed, no evidence either way


def tolerance_for(reference: Score, tuned: Score, fixed: float | None) -> float:
    """An allowed drop: the fixed one if given, else twice the two scores' combined stderr."""
    if fixed is not None:
        return fixed
    return 2 * math.sqrt((reference.stderr or 0) ** 2 + (tuned.stderr or 0) ** 2)


def comparable(ref: Score, new: Score) -> str | None:
    """None when the two scores may be compared; else why not."""
    from tasks.benchmarks.provenance import why_not_comparable

    if ref.comparability_key == new.comparability_key:
        return None
    return why_not_comparable(ref.comparability, new.comparability)


def decide(
    tuned: dict[str, Score], reference: dict[str, Score], against: str,
    tolerance: float | None = None, blocking_health: list[str] | None = None,
    allow_incomparable: bool = False,
) -> GateDecision:
    """The gate's verdict from scores alone (pure: the tests drive it directly). Only scores with
    equal comparability keys are evidence; with none, no promotion unless allow_incomparable."""
    table, reasons, incomparable, compared = [], [], [], 0
    for name, new in sorted(tuned.items()):
        ref = reference.get(name)
        if ref is None:  # a newly added benchmark has nothing to regress against
            table.append({"benchmark": name, "reference": None, "tuned": new.score, "delta": None, "tolerance": None,
                          "ok": True, "comparable": None})
            continue
        why = comparable(ref, new)
        if why is not None:  # e.g. 2 items against 10: neither a regression nor an improvement
            incomparable.append(f"{name}: not comparable ({why})")
            table.append({"benchmark": name, "reference": round(ref.score, 4), "tuned": round(new.score, 4),
                          "delta": None, "tolerance": None, "ok": True, "comparable": f"no: {why}"})
            continue
        compared += 1
        delta, allowed = new.score - ref.score, tolerance_for(ref, new, tolerance)
        ok = delta >= -allowed
        table.append({"benchmark": name, "reference": round(ref.score, 4), "tuned": round(new.score, 4),
                      "delta": round(delta, 4), "tolerance": round(allowed, 4), "ok": ok, "comparable": "yes"})
        if not ok:
            reasons.append(f"{name} dropped {-delta:.4f} (from {ref.score:.4f} to {new.score:.4f}), more than its tolerance {allowed:.4f}")
    if tuned and not compared and not allow_incomparable:
        reasons.append("no benchmark score is comparable with the reference's, so there is no evidence the model "
                       "did not regress; set gate.allow_incomparable: true to promote anyway")
    reasons += [f"training health: {sign}" for sign in blocking_health or []]
    return GateDecision(promote=not reasons, against=against, reasons=reasons, table=table, not_comparable=incomparable)


def markdown(decision: GateDecision) -> str:
    verdict = "**Promoted**" if decision.promote else "**Not promoted** (the model is kept in its run folder)"
    rows = "".join(
        f"| {r['benchmark']} | {r['reference']} | {r['tuned']} | {r['delta']} | {r['tolerance']} | "
        f"{'not comparable' if str(r.get('comparable') or '').startswith('no') else 'ok' if r['ok'] else 'REGRESSION'} |\n"
        for r in decision.table
    )
    why = "".join(f"- {reason}\n" for reason in decision.reasons)
    apart = "".join(f"- {line} - not evidence either way\n" for line in decision.not_comparable)
    apart = f"\nNot compared:\n\n{apart}" if apart else ""
    return (f"# Regression gate\n\n{verdict}, compared with the {decision.against}.\n\n{why}{apart}\n"
            f"| benchmark | reference | tuned | delta | tolerance | |\n|---|---|---|---|---|---|\n{rows}")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def regression_gate(
    root: str, flow_name: str, run_uri: str, base: dict[str, Any], tuned: dict[str, Any],
    tolerance: float | None, blocking_health: list[str], allow_incomparable: bool = False,
) -> GateDecision:
    """Compare with the promoted run (or the base model), and write the decision to the run folder."""
    # Scores arrive as BenchmarkResults (or anything with .score/.stderr and a comparability key).
    base = {n: Score.of(r) for n, r in base.items()}
    tuned = {n: Score.of(r) for n, r in tuned.items()}
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
    decision = decide(tuned, reference, against, tolerance, blocking_health, allow_incomparable)
    run = ArtifactStore(run_uri)
    run.write_json("gate/decision.json", decision.model_dump())
    run.write_text("gate/decision.md", markdown(decision))
    create_markdown_artifact(key="smolflow-gate", markdown=markdown(decision), description="Promotion decision")
    return decision


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30])
def promote(root: str, flow_name: str, run_id: str) -> str:
    """Move the flow's `promoted` pointer to this run (after its manifest is written)."""
    return set_pointer(root, flow_name, "promoted", run_id)
