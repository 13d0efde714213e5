"""The one comparison of two scores on a benchmark: delta, noise, beyond noise, allowed drop.

The report (base vs tuned), the gate (promoted or base vs tuned) and W&B all call `compare`, so a
"regression" or a "real gain" means the same thing everywhere. Two models scored on the same items
(equal comparability keys) are compared item by item: the standard error of the per-item
differences, which is smaller than the two scores' errors combined as if independent, since both
models find the same items easy or hard (Miller 2024, "Adding Error Bars to Evals").
"""

from __future__ import annotations

import math
from typing import Protocol


class ScoreLike(Protocol):
    score: float
    stderr: float | None


def combined_stderr(a: ScoreLike, b: ScoreLike) -> float:
    """The standard error of the difference of two independent scores (0 where unknown)."""
    return math.sqrt((a.stderr or 0) ** 2 + (b.stderr or 0) ** 2)


def item_values(records: list[dict]) -> dict[str, float]:
    """{subset/doc_id: 1.0 or 0.0} from per-item records (their `correct`), the scores' own items."""
    return {f"{r.get('subset') or ''}/{r.get('doc_id')}": float(r["correct"]) for r in records if "correct" in r}


def paired_stderr(reference: dict[str, float] | None, new: dict[str, float] | None) -> float | None:
    """The standard error of the mean per-item difference, when both models have a value for the
    same items (two or more); else None (then the independent formula applies). Where every item
    moved alike (usually: both models gave the same verdict on every item) the spread is 0, which
    shows no noise only because the sample is small: on 3 items it made the allowed drop 0.0. Then
    the error is that of one item in n having differed, the least change n items can show
    (n = 3: 0.33, 10: 0.1, 300: 0.003), so few items stay weak evidence and many stay sharp."""
    if not reference or not new or reference.keys() != new.keys() or len(new) < 2:
        return None
    diffs = [new[k] - reference[k] for k in new]
    if len(set(diffs)) == 1:
        diffs = [diffs[0] + 1, *diffs[1:]]
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def compare(reference: ScoreLike, new: ScoreLike, tolerance: float | None = None, paired: float | None = None) -> dict:
    """How `new` differs from `reference`.

    stderr: `paired` (paired_stderr of the two models' items) when given, else the combined
    standard error of two independent scores; noise says which, or 'unknown' (a score of under two
    items has no standard error: then any drop counts, and the gate says the evidence is weak).
    beyond_noise: the change exceeds twice that standard error (about 95%).
    allowed_drop: `tolerance` when given, else that same twice-the-stderr band.
    regressed: the score fell by more than allowed_drop.
    """
    delta = new.score - reference.score
    known = paired is not None or (reference.stderr is not None and new.stderr is not None)
    noise = paired if paired is not None else combined_stderr(reference, new)
    allowed = tolerance if tolerance is not None else 2 * noise
    return {
        "reference": round(reference.score, 4),
        "new": round(new.score, 4),
        "delta": round(delta, 4),
        "stderr": round(noise, 4) if known else None,
        "noise": "paired" if paired is not None else "independent" if known else "unknown",
        "beyond_noise": bool(known and abs(delta) > 2 * noise),
        "allowed_drop": round(allowed, 4),
        "regressed": delta < -allowed,
    }
