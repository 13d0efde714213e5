"""Arena rating math: Bradley-Terry ratings with bootstrap confidence intervals, as Chatbot Arena
computes them, and the choice of which pairs to battle next.

- A battle is (model_a, model_b, outcome) with outcome "a", "b" or "tie" ("both bad" is a tie).
- Bradley-Terry: P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / 400)), i.e. a logistic regression on
  pairwise outcomes with one coefficient per model. A tie counts as half a win for each side (each
  battle enters twice, as Chatbot Arena does: a tie once as a win and once as a loss).
- Elo scale: rating = 1000 + 400 / ln 10 * theta, anchored so the anchor model (the base) is 1000.
- Fitted by Newton's method (IRLS) in plain numpy: a handful of models makes the Hessian tiny, and
  a small ridge keeps a model that won (or lost) every battle finite instead of drifting to infinity.
- 95% intervals: percentiles of the ratings refitted on battles resampled with replacement.
- Two models differ significantly when the bootstrap interval of their rating difference excludes
  0 (95% for the whole family of pairs, Bonferroni); with no such pair the leaderboard says so in words.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SCALE = 400.0 / math.log(10)  # logit units -> Elo points
BASE_RATING = 1000.0
RIDGE = 1e-4  # in logit units: shifts a rating by far less than a point when the data decide it
OUTCOMES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
NO_DIFFERENCE = "No significant difference between any two models (95% bootstrap, Bonferroni over the pairs)."
# Resampling only ties gives only ties: every interval shrinks to its point, which reads as certainty.
ALL_TIES = ("Every battle was a tie: no model was told apart from another, and the intervals' zero width comes "
            "from that, not from certainty. A judge that ties everything (the built-in SmolLM2-135M-Instruct "
            "names the same position whatever the order) tells nothing: point the arena's judge at a stronger "
            "model, or vote on the page (smolflow arena serve).")


def _counts(battles: list[dict[str, Any]], models: list[str]) -> np.ndarray:
    """(pairs, 3) rows of [index a, index b, score of a in 0/0.5/1] for battles between known models."""
    index = {m: i for i, m in enumerate(models)}
    rows = [(index[b["model_a"]], index[b["model_b"]], OUTCOMES[b["outcome"]]) for b in battles
            if b["model_a"] in index and b["model_b"] in index and b["model_a"] != b["model_b"]]
    return np.array(rows, dtype=float).reshape(-1, 3)


def fit_thetas(rows: np.ndarray, n_models: int, anchor: int, weights: np.ndarray | None = None,
               iterations: int = 50) -> np.ndarray:
    """Maximum-likelihood logit strengths (anchor fixed at 0) from [a, b, score] rows, by Newton."""
    a, b, y = rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2]
    w = np.ones(len(rows)) if weights is None else weights
    free = np.array([i for i in range(n_models) if i != anchor], dtype=int)
    theta = np.zeros(n_models)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
        resid, curv = w * (y - p), w * p * (1 - p)
        grad = np.zeros(n_models)
        np.add.at(grad, a, resid)
        np.add.at(grad, b, -resid)
        hess = np.zeros((n_models, n_models))
        np.add.at(hess, (a, a), curv)
        np.add.at(hess, (b, b), curv)
        np.add.at(hess, (a, b), -curv)
        np.add.at(hess, (b, a), -curv)
        g = grad[free] - RIDGE * theta[free]
        h = hess[np.ix_(free, free)] + RIDGE * np.eye(len(free))
        step = np.linalg.solve(h, g)
        theta[free] += step
        if np.max(np.abs(step), initial=0.0) < 1e-10:
            break
    return theta


def fit_ratings(battles: list[dict[str, Any]], models: list[str], anchor: str,
                rounds: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Elo-scale Bradley-Terry ratings (anchor = 1000) with percentile intervals from `rounds`
    bootstrap resamples of the battles: {"ratings": {model: {rating, lower, upper, battles}},
    "better": [[a, b], ...] pairs where a beats b significantly}."""
    if anchor not in models:
        raise ValueError(f"arena: the anchor model {anchor!r} is not among the models {models}")
    battles_rows = _counts(battles, models)
    k = models.index(anchor)
    played = np.zeros(len(models), dtype=int)
    np.add.at(played, battles_rows[:, 0].astype(int), 1)
    np.add.at(played, battles_rows[:, 1].astype(int), 1)
    # Identical battles collapse into one row with a count: at most 3 rows per ordered pair, so a
    # fit costs the same for 30 or 30,000 battles.
    rows, counts = np.unique(battles_rows, axis=0, return_counts=True)
    n = len(battles_rows)
    point = fit_thetas(rows, len(models), k, counts.astype(float)) if n else np.zeros(len(models))
    rng = np.random.default_rng(seed)
    samples = np.zeros((rounds, len(models)))
    for r in range(rounds):
        if n:  # resampling battles with replacement = multinomial counts over the distinct battles
            samples[r] = fit_thetas(rows, len(models), k, rng.multinomial(n, counts / n).astype(float))
    tail = (1 - level) / 2 * 100
    lower, upper = np.percentile(samples, [tail, 100 - tail], axis=0)
    ratings = {m: {"rating": float(BASE_RATING + SCALE * point[i]), "lower": float(BASE_RATING + SCALE * lower[i]),
                   "upper": float(BASE_RATING + SCALE * upper[i]), "battles": int(played[i])}
               for i, m in enumerate(models)}
    # Significance from the bootstrap distribution of each difference, not from interval overlap:
    # the anchor's own interval has zero width (it is 1000 by definition), so overlap with it
    # would overstate every difference from the base model. Bonferroni over the pairs: "no
    # significant difference" is a claim about all of them at once, and 15 pairs tested at 5%
    # each would find a "difference" between equal models most of the time.
    pairs = max(1, len(models) * (len(models) - 1) // 2)
    family_tail = tail / pairs
    better = [[a, b] for i, a in enumerate(models) for j, b in enumerate(models)
              if i != j and n and np.percentile(samples[:, i] - samples[:, j], family_tail) > 0]
    decided = int(np.count_nonzero(battles_rows[:, 2] != 0.5))
    return {"ratings": ratings, "better": better, "battles": n, "decided": decided}


def overlapping(ratings: dict[str, dict[str, float]]) -> bool:
    """True when every pair of models' intervals overlap."""
    return all(r["lower"] <= s["upper"] for r in ratings.values() for s in ratings.values())


def leaderboard(fit: dict[str, Any], names: dict[str, str] | None = None) -> dict[str, Any]:
    """Rows best first, each with Chatbot Arena's rank (1 + models significantly better), and a
    verdict; `names` maps model keys to display names for the verdict and the significant pairs."""
    ratings, better = fit["ratings"], fit["better"]
    names = names or {}
    rows = [{"model": m, "name": names.get(m, m), "rank": 1 + sum(1 for _, worse in better if worse == m),
             **{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}}
            for m, r in sorted(ratings.items(), key=lambda kv: -kv[1]["rating"])]
    shown = [[names.get(a, a), names.get(b, b)] for a, b in better]
    verdict = (ALL_TIES if fit.get("battles") and not fit.get("decided") else NO_DIFFERENCE if not better else
               "Significant differences (95% bootstrap, Bonferroni over the pairs): "
               + "; ".join(f"{a} > {b}" for a, b in shown))
    return {"rows": rows, "significant": shown, "verdict": verdict}


def win_probability(rating_a: float, rating_b: float) -> float:
    return 1.0 / (1.0 + 10 ** ((rating_b - rating_a) / 400.0))


def schedule(models: list[str], prompts: list[str], ratings: dict[str, float] | None = None,
             played: dict[tuple[str, str], int] | None = None, limit: int | None = None) -> list[tuple[str, str, str]]:
    """(model_a, model_b, prompt) battles, the most informative first: pairs whose outcome is least
    certain (close ratings, p(1-p) high) and that have battled least, each pair cycling through prompts."""
    ratings = ratings or {}
    played = dict(played or {})
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]
    used = {p: 0 for p in pairs}
    total = len(pairs) * len(prompts) if limit is None else min(limit, len(pairs) * len(prompts))
    out = []
    while len(out) < total:
        def value(pair):
            p = win_probability(ratings.get(pair[0], BASE_RATING), ratings.get(pair[1], BASE_RATING))
            return p * (1 - p) / (1 + played.get(pair, 0))
        pair = max((p for p in pairs if used[p] < len(prompts)), key=value)
        out.append((*pair, prompts[used[pair]]))
        used[pair] += 1
        played[pair] = played.get(pair, 0) + 1
    return out
