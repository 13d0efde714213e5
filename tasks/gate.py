"""Regression gate: promote tonight's tuned model only if no benchmark dropped beyond its
tolerance against the last promoted model (on the first run: against the base model) and the
training-health check raised no blocking sign. A rejected model stays in its run folder."""

from __future__ import annotations

import json
import posixpath
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.compare import compare, item_values, paired_stderr
from tasks.config import GateConfig
from tasks.layout import RunPaths, run_dir
from tasks.pointers import pointer_lock, read_pointer, read_pointer_seen, swap_pointer
from tasks.prefect_markdown import publish_markdown
from tasks.runtime import retry_transient, run_logger
from tasks.storage import ArtifactStore


class Score(BaseModel):
    score: float
    stderr: float | None = None
    n: int | None = None
    # Equal keys: same data, items, n-shot, format, template, generation and scorer (provenance.py).
    # Scores without one (older runs, hand-made) compare only with each other.
    comparability_key: str | None = None
    comparability: dict[str, Any] | None = None
    # Per item (compare.item_values), to compare two models on the same items item by item.
    items: dict[str, float] | None = Field(None, exclude=True)

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
    reference_run: str | None = None  # the promoted run compared with (None: the base model)
    not_comparable: list[str] = []  # "<benchmark>: not comparable (why)": listed, no evidence either way
    weak: list[str] = []  # "<benchmark>: ..." where noise hides drops over WEAK_DROP: said, not a reason


WEAK_DROP = 0.10  # an allowed drop above this (10 points) is said in the decision: the gate cannot see less


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
    table, reasons, incomparable, weak, compared = [], [], [], [], 0
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
        c = compare(ref, new, tolerance, paired=paired_stderr(ref.items, new.items))
        table.append({"benchmark": name, "reference": c["reference"], "tuned": c["new"], "delta": c["delta"],
                      "tolerance": c["allowed_drop"], "ok": not c["regressed"], "comparable": "yes",
                      "stderr": c["stderr"], "noise": c["noise"]})
        sharpen = ("add items to its file" if name.startswith("custom/") else "raise its benchmarks[].limit")
        if tolerance is None and c["noise"] == "unknown":
            weak.append(f"{name}: on {new.n or '?'} item(s) there is no standard error, so any drop counts as a "
                        f"regression and no gain is evidence; {sharpen} for a real gate")
        elif tolerance is None and c["allowed_drop"] > WEAK_DROP:
            weak.append(f"{name}: on {new.n or '?'} items a drop of up to {c['allowed_drop']:.2f} is within noise, so "
                        f"smaller regressions pass unseen; {sharpen} for a sharper gate")
        if c["regressed"]:
            reasons.append(f"{name} dropped {-c['delta']:.4f} (from {ref.score:.4f} to {new.score:.4f}), "
                           f"more than its tolerance {c['allowed_drop']:.4f}")
    for name in sorted(set(reference) - set(tuned)):  # dropped from tonight's benchmarks: said, not judged
        incomparable.append(f"{name}: not scored tonight (the {against} has it)")
        table.append({"benchmark": name, "reference": round(reference[name].score, 4), "tuned": None, "delta": None,
                      "tolerance": None, "ok": True, "comparable": "no: not scored tonight"})
    if not compared and not allow_incomparable:
        reasons.append(("no benchmark score is comparable with the reference's" if tuned else
                        "no benchmark was scored (benchmarks is empty)") + ", so there is no evidence the model "
                       "did not regress; set gate.allow_incomparable: true to promote anyway")
    reasons += [f"training health: {sign}" for sign in blocking_health or []]
    return GateDecision(promote=not reasons, against=against, reasons=reasons, table=table, not_comparable=incomparable,
                        weak=weak)


def section(decision: GateDecision) -> str:
    """The decision as the report's section: verdict, reasons, per-benchmark table."""
    verdict = "**Promoted**" if decision.promote else "**Not promoted** (the model is kept in its run folder)"
    rows = "".join(
        f"| {r['benchmark']} | {r['reference']} | {r['tuned']} | {r['delta']} | {r['tolerance']} | "
        f"{'not comparable' if str(r.get('comparable') or '').startswith('no') else 'ok' if r['ok'] else 'REGRESSION'} |\n"
        for r in decision.table
    )
    why = "".join(f"- {reason}\n" for reason in decision.reasons)
    apart = "".join(f"- {line} - not evidence either way\n" for line in decision.not_comparable)
    apart = f"\nNot compared:\n\n{apart}" if apart else ""
    weak = "".join(f"- {line}\n" for line in decision.weak)
    weak = f"\nWeak evidence:\n\n{weak}" if weak else ""
    return (f"{verdict}, compared with the {decision.against}.\n\n{why}{apart}{weak}\n"
            f"| benchmark | reference | tuned | delta | tolerance | |\n|---|---|---|---|---|---|\n{rows}")


def markdown(decision: GateDecision) -> str:
    return f"# Regression gate\n\n{section(decision)}"


REJECTED_EVENT = "smolflow.promotion.rejected"  # what an alert automation matches (deployments/alerts.py)


def read_scores(run: ArtifactStore, role: str, names: list[str] | None = None) -> dict[str, Score]:
    """A run folder's saved scores of one model ('base' or 'tuned'), by benchmark (evaluation wrote them)."""
    if names is None:
        names = [row["benchmark"] for row in run.read_json(RunPaths.comparison)] if run.exists(RunPaths.comparison) else []
    scores = {}
    for name in names:
        if run.exists(RunPaths.benchmark_summary(name, role)):
            scores[name] = Score(**run.read_json(RunPaths.benchmark_summary(name, role)))
            if run.exists(records := RunPaths.benchmark_records(name, role)):
                rows = [json.loads(line) for line in run.read_text(records).splitlines() if line.strip()]
                scores[name].items = item_values(rows) or None
    return scores


def reference_scores(root: str, flow_name: str, names, run: ArtifactStore | None) -> tuple[dict[str, Score], str, str | None]:
    """Read `promoted` now: (its tuned scores, "against" text, its run id); the base model's scores
    of `run` when nothing is promoted yet. Where `run` scored the promoted model again tonight
    (tasks/reference.py: its saved score was measured another way), those scores stand in."""
    pointer = read_pointer(root, flow_name, "promoted")
    if pointer is None:
        base = read_scores(run, "base", list(names)) if run is not None else {}
        return base, "base model (first run: nothing promoted yet)", None
    promoted = ArtifactStore(pointer["run_uri"])
    # Tonight's benchmarks and every one the promoted run has: one missing tonight is named in the decision.
    theirs = [row["benchmark"] for row in promoted.read_json(RunPaths.comparison)] \
        if promoted.exists(RunPaths.comparison) else []
    scores, against = read_scores(promoted, "tuned", sorted({*names, *theirs})), f"promoted run {pointer['run_id']}"
    if by_hand := pointer.get("by_hand"):  # `smolflow promote`: a person chose it, not a gate
        against += f" (promoted by hand by {by_hand['by']}: {by_hand['reason']})"
    again = run.read_json(RunPaths.promoted_rescored) if run is not None and run.exists(RunPaths.promoted_rescored) else None
    if again and again["run_id"] == pointer["run_id"]:  # another run promoted since: its own scores
        scores |= read_scores(run, "promoted", again["benchmarks"])
        against += f" (its model scored again tonight on {', '.join(again['benchmarks'])})"
    return scores, against, pointer["run_id"]


def emit_rejection(flow_name: str, run_id: str, decision: GateDecision) -> None:
    """A Prefect event for a rejected model, which an automation can turn into a notification."""
    from prefect.events import emit_event

    emit_event(
        event=REJECTED_EVENT,
        resource={"prefect.resource.id": f"smolflow.run.{run_id}", "prefect.resource.name": run_id,
                  "smolflow.flow": flow_name},
        payload={"against": decision.against, "reasons": decision.reasons},
    )


def save_decision(run: ArtifactStore, decision: GateDecision) -> None:
    """The decision in the run folder: gate/decision.json and .md, and the report's gate section."""
    run.write_json(RunPaths.gate, decision.model_dump())
    run.write_text(RunPaths.gate_md, markdown(decision))
    run.write_text(RunPaths.section("gate"), section(decision))


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[5, 30])
def regression_gate(
    root: str, flow_name: str, run_uri: str, gate: GateConfig, blocking_health: list[str],
) -> GateDecision:
    """Compare with the promoted run (or the base model), and write the decision to the run folder."""
    run = ArtifactStore(run_uri)
    tuned = read_scores(run, "tuned")
    reference, against, reference_run = reference_scores(root, flow_name, tuned, run)
    decision = decide(tuned, reference, against, gate.tolerance, blocking_health, gate.allow_incomparable)
    decision.reference_run = reference_run
    if not gate.enabled:
        decision.promote = False
        decision.reasons.append("the gate is off (gate.enabled: false): never promoted, whatever the scores")
    save_decision(run, decision)
    publish_markdown("smolflow-gate", markdown(decision), description="Promotion decision")
    if not decision.promote:
        emit_rejection(flow_name, posixpath.basename(run_uri.rstrip("/")), decision)
    return decision


@task(cache_policy=NO_CACHE, retries=3, retry_condition_fn=retry_transient, retry_delay_seconds=[2, 10, 30])
def promote(root: str, flow_name: str, run_id: str, decision: GateDecision | None = None,
            tolerance: float | None = None, allow_incomparable: bool = False) -> str | None:
    """Move the flow's `promoted` pointer to this run (after its manifest is written), compare-and-swap:
    if another run was promoted since this run's gate, compare with that one first. None: rejected."""
    with pointer_lock(root, f"promote {run_id}"):
        while True:
            current, seen = read_pointer_seen(root, flow_name, "promoted")
            now = current["run_id"] if current else None
            # (`now` is this run after a retried task's first try had moved it, before its answer came)
            if decision is not None and now not in (decision.reference_run, run_id):
                # Two runs finishing together both passed a gate against the same old reference:
                # the later one must beat the one promoted in between, not the older reference.
                run = ArtifactStore(root).child(run_dir(run_id))
                tuned = read_scores(run, "tuned", [row["benchmark"] for row in decision.table])
                reference, against, reference_run = reference_scores(root, flow_name, tuned, None)
                recheck = decide(tuned, reference, against, tolerance, allow_incomparable=allow_incomparable)
                recheck.reference_run = reference_run
                run_logger().info("Promotion re-check against %s: %s", against,
                                  "pass" if recheck.promote else recheck.reasons)
                if not recheck.promote:
                    # The run folder said "Promoted" (the gate's first decision): it says what happened now;
                    # the flow stitches its report again.
                    recheck.against += (f", promoted while this run was scored (re-checked at promotion; its gate "
                                        f"had passed against the {decision.against})")
                    save_decision(run, recheck)
                    publish_markdown("smolflow-gate", markdown(recheck),
                                     description="Promotion decision (re-checked at promotion)")
                    emit_rejection(flow_name, run_id, recheck)
                    return None
                decision = recheck
            if (uri := swap_pointer(root, flow_name, "promoted", run_id, seen)) is not None:
                return uri
            # On S3 without a shared Prefect server another machine's run moved it since it was read.
            run_logger().info("`promoted` was moved by another run while this one was compared: reading it again")
