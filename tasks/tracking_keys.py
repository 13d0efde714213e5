"""The keys smolflow logs into a W&B run's summary, named once for both flows (tasks/tracking.py
logs them): bench/<name>/*, gate/*, judge/* and the judge's pairs table.

Scores are rounded to 4 places, as comparison.json and `smolflow eval` print them, so the W&B runs
table shows the numbers the run folder holds.
"""

from __future__ import annotations

from tasks.evaluation import comparison_row, source_note

JUDGE_KEYS = ("win_rate", "stderr", "n", "wins", "ties", "losses", "parse_failures")


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def judge_logs(judge) -> tuple[dict, dict]:
    """The judge's pairs as a table and its numbers as judge/* summary keys; the same in both flows."""
    if judge is None:
        return {}, {}
    import wandb

    pairs = wandb.Table(columns=["instruction", "tuned", "reference", "verdict_tuned_as_a", "verdict_tuned_as_b",
                                 "preference"])
    for r in judge.records:
        pairs.add_data(r["instruction"], r["output"], r["reference_output"], r["verdict_tuned_as_a"],
                       r["verdict_tuned_as_b"], r["preference"])
    return {"judge_pairs": pairs}, {f"judge/{k}": getattr(judge, k) for k in JUDGE_KEYS if getattr(judge, k) is not None}


def bench_keys(name: str, role: str, result) -> dict:
    """bench/<name>/<role> and <role>_stderr, rounded, and what the score is (metric, comparability
    key, source): one naming for both flows, so the W&B runs table sorts nightlies and evals together
    (an eval's model is its `tuned`, as in the run folder's headline scores)."""
    out = {f"bench/{name}/{role}": rounded(result.score), f"bench/{name}/{role}_stderr": rounded(result.stderr),
           f"bench/{name}/{role}_n": result.n,  # how many items: 0.3333 of 3 is not 0.3333 of 300
           f"bench/{name}/metric": result.metric, f"bench/{name}/comparability_key": result.comparability_key,
           f"bench/{name}/source": source_note(result),
           f"bench/{name}/comparable_to_published": bool(result.provenance.get("comparable_to_published"))}
    return {k: v for k, v in out.items() if v is not None}


def bench_summary(scores: dict) -> dict:
    """bench/<name>/{base,tuned}[_stderr], delta, beyond_noise, metric, comparability_key, source:
    flat keys the W&B runs table can sort and chart across runs."""
    out = {}
    for name, pair in scores.items():
        row = comparison_row(pair["base"], pair["tuned"])
        out |= bench_keys(name, "base", pair["base"]) | bench_keys(name, "tuned", pair["tuned"])
        out[f"bench/{name}/beyond_noise"] = row["beyond_noise"]
        if row["delta"] is not None:  # scores measured differently have no delta
            out[f"bench/{name}/delta"] = row["delta"]
    return out


def gate_summary(decision) -> dict:
    """The gate's verdict as it ruled, before promotion (gate/passed: promote() re-checks it, see
    finish_wandb), what it compared against, and per benchmark gate/<bench>/{reference, delta,
    allowed_drop, ok} (gate/decision.json's table)."""
    if decision is None:
        return {}
    out = {"gate/passed": decision.promote, "gate/against": decision.against, "gate/reasons": list(decision.reasons),
           "gate/reference_run": decision.reference_run or "base model"}
    for row in decision.table:
        if row.get("comparable") != "yes":  # new, not comparable, or not scored tonight: nothing was judged
            continue
        out |= {f"gate/{row['benchmark']}/{key}": row[col] for key, col in (
            ("reference", "reference"), ("delta", "delta"), ("allowed_drop", "tolerance"), ("ok", "ok"))}
    return out
