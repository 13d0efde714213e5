"""Training health: the seed tutorial's warning signs, read off the loss curves and the samples.

Each check is a pure function of the Trainer's log history (or the after-training samples) that
returns a `Sign`: whether it fired, the numbers behind it, and what to change. `assess_training`
runs them all; `plot_curves` draws train/eval loss and the learning rate for the run folder.
"""

from __future__ import annotations

import re

import base64

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.generation import RUNAWAY_FACTOR, Sample
from tasks.layout import RunPaths
from tasks.prefect_markdown import publish_markdown
from tasks.runtime import figure_png, retry_transient
from tasks.storage import ArtifactStore

# Thresholds, in nats of per-token cross-entropy. Chosen for chat SFT of small models, where a
# healthy run drops a few tenths from ~2-3 and eval tracks train within a few tenths.
RISE = 0.02  # eval loss this far (relative) above its minimum counts as rising
MIN_DROP = 0.05  # train loss falling less than this (relative) from start to end: barely moved
VERY_LOW = 0.1  # train loss below this: the model likely recites its training data
GAP = 0.5  # eval minus train loss above this: the model fits the train split, not the task
ROLE_LINE = re.compile(r"(?m)^\s*(system|user|assistant)\s*$|<\|im_(start|end)\|>|^\s*(User|Assistant):")


BLOCKING = ("overfitting", "memorisation", "format")


class Sign(BaseModel):
    name: str  # overfitting, underfitting, memorisation, format
    fired: bool
    summary: str  # one sentence with the numbers
    numbers: dict[str, float | int | None]
    advice: str  # what to change; empty when the sign did not fire
    checked: bool = True  # False: too little to tell (e.g. under 3 eval points), which is not "ok"


class HealthReport(BaseModel):
    healthy: bool
    signs: list[Sign]

    def markdown(self) -> str:
        head = "Healthy: no warning signs." if self.healthy else "Warning signs: " + ", ".join(
            s.name for s in self.signs if s.fired) + "."
        unchecked = [s.name for s in self.signs if not s.checked]
        head += f" Not checked (too little to tell): {', '.join(unchecked)}." if unchecked else ""
        rows = "".join(
            f"| {'⚠️' if s.fired else 'ok' if s.checked else 'not checked'} {s.name} | {s.summary} | {s.advice or '-'} |\n"
            for s in self.signs
        )
        return f"{head}\n\n| sign | what the numbers say | advice |\n|---|---|---|\n{rows}"

    def blocking(self) -> list[str]:
        """The fired signs that must keep a model from promotion (underfitting alone does not:
        a model that barely moved is no worse than the one it would replace)."""
        return [f"{s.name}: {s.summary}" for s in self.signs if s.fired and s.name in BLOCKING]

    def summary(self) -> dict:
        """Flat keys for the W&B run summary: health/<sign>/fired (true: the warning sign fired, not
        "that part is fine"), health/<sign>/checked (false: too little to tell), its numbers, and
        health/warnings, the signs that fired."""
        out: dict = {"health/healthy": self.healthy, "health/warnings": [s.name for s in self.signs if s.fired]}
        for s in self.signs:
            out[f"health/{s.name}/fired"] = s.fired
            out[f"health/{s.name}/checked"] = s.checked
            out.update({f"health/{s.name}/{k}": v for k, v in s.numbers.items() if v is not None})
        return out


def series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one logged quantity, e.g. 'loss', 'eval_loss', 'learning_rate'."""
    return [(int(h["step"]), float(h[key])) for h in log_history if key in h and "step" in h]


def _edge_mean(points: list[tuple[int, float]], last: bool) -> float:
    """Mean of the first (or last) fifth of a noisy curve, at least one point."""
    k = max(1, len(points) // 5)
    chunk = points[-k:] if last else points[:k]
    return sum(v for _, v in chunk) / len(chunk)


def check_overfitting(log_history: list[dict]) -> Sign:
    """Eval loss turned up while train loss kept falling; reports the step where it turned."""
    train, evals = series(log_history, "loss"), series(log_history, "eval_loss")
    if len(evals) < 3 or len(train) < 2:
        return Sign(name="overfitting", fired=False, numbers={"eval_points": len(evals)},
                    summary=f"not enough eval points to tell ({len(evals)} < 3)", advice="", checked=False)
    turn_step, best = min(evals, key=lambda p: p[1])
    last_step, last = evals[-1]
    train_at_turn = min(train, key=lambda p: abs(p[0] - turn_step))[1]
    train_end = _edge_mean(train, last=True)
    fired = last > best * (1 + RISE) and last_step > turn_step and train_end < train_at_turn
    numbers = {"turn_step": turn_step, "best_eval_loss": round(best, 4), "last_eval_loss": round(last, 4),
               "train_loss_at_turn": round(train_at_turn, 4), "train_loss_end": round(train_end, 4)}
    summary = (f"eval loss rose from {best:.3f} (step {turn_step}) to {last:.3f} (step {last_step}) "
               f"while train loss fell {train_at_turn:.3f} → {train_end:.3f}") if fired else (
               f"eval loss {last:.3f} at the end, best {best:.3f} at step {turn_step}")
    advice = (f"Train for fewer steps (about {turn_step}), add more data, or lower the learning rate."
              if fired else "")
    return Sign(name="overfitting", fired=fired, numbers=numbers, summary=summary, advice=advice)


def check_underfitting(log_history: list[dict]) -> Sign:
    """Train loss barely moved from its start."""
    train = series(log_history, "loss")
    if len(train) < 3:
        return Sign(name="underfitting", fired=False, numbers={"train_points": len(train)},
                    summary=f"not enough train-loss points to tell ({len(train)} < 3)", advice="",
                    checked=False)
    start, end = _edge_mean(train, last=False), _edge_mean(train, last=True)
    drop = (start - end) / start if start > 0 else 0.0
    fired = drop < MIN_DROP
    return Sign(
        name="underfitting", fired=fired,
        numbers={"train_loss_start": round(start, 4), "train_loss_end": round(end, 4), "relative_drop": round(drop, 4)},
        summary=f"train loss {start:.3f} → {end:.3f} ({drop:.1%} drop"
        + (f", under {MIN_DROP:.0%})" if fired else ")"),
        advice="Train for more steps, raise the learning rate (e.g. 2-5x), and check that the data "
        "and chat template are what you expect." if fired else "",
    )


def check_memorisation(log_history: list[dict]) -> Sign:
    """Train loss extremely low, or far below eval loss: the model recites rather than generalises."""
    train, evals = series(log_history, "loss"), series(log_history, "eval_loss")
    if not train:
        return Sign(name="memorisation", fired=False, numbers={}, summary="no train loss logged", advice="", checked=False)
    end = _edge_mean(train, last=True)
    last_eval = evals[-1][1] if evals else None
    gap = last_eval - end if last_eval is not None else None
    very_low, wide = end < VERY_LOW, gap is not None and gap > GAP
    fired = very_low or wide
    why = [f"train loss {end:.3f} < {VERY_LOW}"] if very_low else []
    why += [f"eval - train gap {gap:.3f} > {GAP}"] if wide else []
    return Sign(
        name="memorisation", fired=fired,
        numbers={"train_loss_end": round(end, 4), "eval_loss": None if last_eval is None else round(last_eval, 4),
                 "gap": None if gap is None else round(gap, 4)},
        summary="; ".join(why) if fired else f"train loss {end:.3f}"
        + (f", eval - train gap {gap:.3f}" if gap is not None else ""),
        advice="Use fewer steps or epochs, more (and more varied) data, or a lower learning rate; "
        "check that the test split does not repeat training rows." if fired else "",
    )


def check_format(samples: list[Sample]) -> Sign:
    """After-training answers that never stop (no EOS) or write template pieces (role tags)."""
    if not samples:
        return Sign(name="format", fired=False, numbers={}, summary="no samples to check", advice="", checked=False)
    # A sample cut off at the token limit that ends its turn when let go on (generate_samples) is
    # a long answer; one that did not end within RUNAWAY_FACTOR x the limit, or was not let go on, never stops.
    long = [s for s in samples if not s.stopped_at_eos and s.ends_within is not None]
    no_eos = [s.prompt for s in samples if not s.stopped_at_eos and s.ends_within is None]
    broken = [s.prompt for s in samples if ROLE_LINE.search(s.completion)]
    fired = bool(no_eos or broken)
    parts = [f"{len(no_eos)}/{len(samples)} samples did not stop at EOS, not even let go on to {RUNAWAY_FACTOR}x "
             f"sampling.max_new_tokens: a runaway answer (e.g. to {no_eos[0]!r})"] if no_eos else []
    parts += [f"{len(broken)}/{len(samples)} contain role tags or template tokens (e.g. {broken[0]!r})"] if broken else []
    longer = (f"; {len(long)} longer than the token limit ended at "
              f"{', '.join(str(s.ends_within) for s in long)} tokens") if long else ""
    return Sign(
        name="format", fired=fired,
        numbers={"samples": len(samples), "no_eos": len(no_eos), "template_breaks": len(broken), "long": len(long)},
        summary=("; ".join(parts) if fired else f"all {len(samples)} samples end their turn (EOS) without role tags") + longer,
        advice="Check that the chat template ends each assistant turn with the EOS token the model "
        "generates, or train longer on complete conversations." if fired else "",
    )


def assess(log_history: list[dict], samples: list[Sample]) -> HealthReport:
    signs = [check_overfitting(log_history), check_underfitting(log_history),
             check_memorisation(log_history), check_format(samples)]
    return HealthReport(healthy=not any(s.fired for s in signs), signs=signs)


# Not cached: it takes milliseconds, and a key of the task's source misses the thresholds in the
# functions above, so a cached re-run after an upgrade kept the older code's verdict (the gate reads it).
@task(cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_transient)
def assess_training(log_history: list[dict], samples: list[Sample]) -> HealthReport:
    """The seed's warning signs (overfitting, underfitting, memorisation, format) for one run."""
    from tasks.runtime import run_logger

    report = assess(log_history, samples)
    run_logger().info("Training health: %s", "healthy" if report.healthy else
                      "; ".join(f"{s.name}: {s.summary}" for s in report.signs if s.fired))
    return report


def plot_curves(log_history: list[dict]) -> bytes:
    """Train/eval loss and learning rate against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    fig, (ax, lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        pts = series(log_history, key)
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    pts = series(log_history, "learning_rate")
    if pts:
        lr.plot(*zip(*pts), color="gray")
    lr.set_ylabel("learning rate")
    lr.set_xlabel("step")
    lr.grid(alpha=0.3)
    return figure_png(fig)


def curves_table(log_history: list[dict]) -> str:
    """The curves' numbers as a markdown table, for places that cannot show the PNG."""
    rows: dict[int, dict] = {}
    for key in ("loss", "eval_loss", "learning_rate"):
        for step, value in series(log_history, key):
            rows.setdefault(step, {})[key] = value
    fmt = lambda r, k, f: format(r[k], f) if k in r else ""  # noqa: E731
    return "| step | train loss | eval loss | learning rate |\n|---|---|---|---|\n" + "".join(
        f"| {s} | {fmt(r, 'loss', '.4f')} | {fmt(r, 'eval_loss', '.4f')} | {fmt(r, 'learning_rate', '.2e')} |\n"
        for s, r in sorted(rows.items())
    )


def training_markdown(metrics: dict, log_history: list[dict], reused_from: str | None) -> str:
    """Steps, losses (named for what they are) and time; a reused model says where it was trained."""
    losses = [v for _, v in series(log_history, "loss")]
    first_last = f" · logged train loss {losses[0]:.4f} → {losses[-1]:.4f}" if losses else ""
    where = (f"Reused from an earlier run with the same model, data and settings (`{reused_from}`): "
             "no training time was spent in this run.\n\n" if reused_from else "")
    return (f"{where}steps {metrics['steps']:.0f} · mean train loss over the run {metrics['train_loss']:.4f}"
            f"{first_last} · eval loss {metrics['eval_loss']:.4f} (perplexity {metrics['eval_perplexity']:.2f})"
            + ("" if reused_from else f" · {metrics['train_runtime_s']:.0f} s") +
            f"\n\n![curves](../{RunPaths.curves})\n")


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[2, 10])
def save_training(run_uri: str, metrics: dict, log_history: list[dict], health: HealthReport,
                  reused_from: str | None = None) -> None:
    """Training metrics, log, curves and the health verdict in the run folder; their report sections
    and Prefect artifacts."""
    run = ArtifactStore(run_uri)
    run.write_json(RunPaths.metrics, metrics)
    run.write_json(RunPaths.log_history, log_history)
    png = plot_curves(log_history)  # train/eval loss and LR, for readers without W&B
    run.write_bytes(RunPaths.curves, png)
    run.write_json(RunPaths.health, health.model_dump())
    run.write_text(RunPaths.health_md, health.markdown())
    run.write_text(RunPaths.section("training"), training_markdown(metrics, log_history, reused_from))
    run.write_text(RunPaths.section("health"), health.markdown())
    publish_markdown("smolflow-training-health", health.markdown(),
                     description="Training warning signs")
    # Prefect's image artifact needs a URL a browser can fetch; a run folder may be local or
    # private S3, so the PNG travels inline, with the numbers as a table below it.
    publish_markdown("smolflow-training-curves", description="Loss and learning-rate curves",
                     markdown=f"![curves](data:image/png;base64,{base64.b64encode(png).decode()})\n\n"
                                      f"{curves_table(log_history)}")
