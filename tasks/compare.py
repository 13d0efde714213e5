"""The one comparison of two scores on a benchmark: delta, noise, beyond noise, allowed drop.

The report (base vs tuned), the gate (promoted or base vs tuned) and W&B all call `compare`, so a
"regression" or a "real gain" means the same thing everywhere.
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


def compare(reference: ScoreLike, new: ScoreLike, tolerance: float | None = None) -> dict:
    """How `new` differs from `reference`.

    beyond_noise: the change exceeds twice the combined standard error (about 95%).
    allowed_drop: `tolerance` when given, else that same twice-the-combined-stderr band.
    regressed: the score fell by more than allowed_drop.
    """
    delta = new.score - reference.score
    noise = combined_stderr(reference, new)
    allowed = tolerance if tolerance is not None else 2 * noise
    return {
        "reference": round(reference.score, 4),
        "new": round(new.score, 4),
        "delta": round(delta, 4),
        "stderr": round(noise, 4),
        "beyond_noise": bool(noise and abs(delta) > 2 * noise),
        "allowed_drop": round(allowed, 4),
        "regressed": delta < -allowed,
    }
