"""Each training-health sign fires on its own synthetic curve and stays silent on a healthy one."""

import json

from tasks.generation import Sample
from tasks.health import assess, check_format, curves_table, plot_curves


def history(train: list[float], evals: dict[int, float], lr: float = 5e-5) -> list[dict]:
    """A log history shaped like the Trainer's: one train row per step, eval rows at some steps."""
    rows = [{"loss": v, "learning_rate": lr, "step": i + 1} for i, v in enumerate(train)]
    rows += [{"eval_loss": v, "step": s} for s, v in evals.items()]
    return sorted(rows, key=lambda r: r["step"])


GOOD = [Sample(prompt="Hi", completion="Hello! How can I help?", new_tokens=7, stopped_at_eos=True)] * 2
HEALTHY = history([2.5 - 0.03 * i for i in range(20)], {5: 2.4, 10: 2.3, 15: 2.2, 20: 2.15})


def fired(report) -> set[str]:
    return {s.name for s in report.signs if s.fired}


def test_a_healthy_curve_raises_no_sign():
    report = assess(HEALTHY, GOOD)
    assert report.healthy and fired(report) == set()
    assert "Healthy" in report.markdown() and report.summary()["health/healthy"] is True


def test_a_sign_with_too_little_to_tell_is_not_checked_rather_than_ok():
    """Two eval points: overfitting cannot be told. The report said "ok overfitting" and W&B only
    fired: false; both say it was not checked."""
    report = assess(history([2.5 - 0.03 * i for i in range(8)], {4: 2.4, 8: 2.3}), GOOD)
    assert report.healthy and [s.name for s in report.signs if not s.checked] == ["overfitting"]
    text = report.markdown()
    assert text.startswith("Healthy: no warning signs. Not checked (too little to tell): overfitting.")
    assert "| not checked overfitting | not enough eval points to tell (2 < 3) |" in text
    assert "| ok underfitting |" in text
    summary = report.summary()
    assert summary["health/overfitting/checked"] is False and summary["health/underfitting/checked"] is True
    assert "Not checked" not in assess(HEALTHY, GOOD).markdown()


def test_overfitting_fires_with_the_step_where_eval_turned():
    log = history([2.5 - 0.1 * i for i in range(20)], {5: 2.3, 10: 2.1, 15: 2.3, 20: 2.6})
    report = assess(log, GOOD)
    assert fired(report) >= {"overfitting"}
    sign = next(s for s in report.signs if s.name == "overfitting")
    assert sign.numbers["turn_step"] == 10 and sign.numbers["last_eval_loss"] == 2.6
    assert "fewer steps (about 10)" in sign.advice


def test_underfitting_fires_when_the_loss_barely_moves():
    log = history([2.50, 2.51, 2.49, 2.50, 2.48, 2.49, 2.47, 2.49, 2.48, 2.48], {5: 2.5, 10: 2.5})
    report = assess(log, GOOD)
    assert fired(report) == {"underfitting"}
    sign = next(s for s in report.signs if s.name == "underfitting")
    assert sign.numbers["relative_drop"] < 0.05 and "learning rate" in sign.advice


def test_memorisation_fires_on_a_tiny_train_loss_or_a_wide_gap():
    tiny = history([2.0, 1.0, 0.3, 0.05, 0.02, 0.01], {3: 1.5, 6: 1.4})
    assert "memorisation" in fired(assess(tiny, GOOD))
    gap = history([2.4, 2.0, 1.6, 1.2, 1.0, 0.9], {2: 2.2, 4: 2.0, 6: 1.9})
    sign = next(s for s in assess(gap, GOOD).signs if s.name == "memorisation")
    assert sign.fired and sign.numbers["gap"] > 0.5 and "fewer steps" in sign.advice


def test_format_fires_on_runaway_answers_and_role_tags():
    runaway = [Sample(prompt="Hi", completion="Hello " * 50, new_tokens=100, stopped_at_eos=False)]
    roles = [Sample(prompt="Hi", completion="Hello!\nuser\nWhat else?", new_tokens=9, stopped_at_eos=True)]
    assert check_format(runaway).fired and check_format(runaway).numbers["no_eos"] == 1
    assert check_format(roles).fired and check_format(roles).numbers["template_breaks"] == 1
    assert fired(assess(HEALTHY, roles)) == {"format"}
    assert not check_format(GOOD).fired


def test_an_answer_longer_than_the_limit_is_told_from_one_that_never_ends(builtin_dir):
    """The real SmolLM2 at a 6-token limit: its greeting is cut off but ends its turn when let go
    on (a long answer: the format sign stays quiet and says so); a story runs past 4x the limit."""
    from tasks.generation import RUNAWAY_FACTOR, generate_samples
    from tasks.models import resolve_model

    ref = resolve_model.fn(str(builtin_dir))
    hello, story = generate_samples.fn(ref, ["Hi!", "Write a long story about a dragon."], 6, let_go_on=True)
    assert generate_samples.fn(ref, ["Hi!"], 6)[0].ends_within is None  # not let go on: as the judge's answers
    assert not hello.stopped_at_eos and hello.new_tokens == 6 and 6 < hello.ends_within <= RUNAWAY_FACTOR * 6
    assert not story.stopped_at_eos and story.ends_within is None
    quiet = check_format([hello])
    assert not quiet.fired and quiet.numbers["long"] == 1
    assert quiet.summary == f"all 1 samples end their turn (EOS) without role tags; 1 longer than the token limit " \
        f"ended at {hello.ends_within} tokens"
    loud = check_format([hello, story])
    assert loud.fired and loud.numbers["no_eos"] == 1
    assert loud.summary.startswith("1/2 samples did not stop at EOS, not even let go on to 4x sampling.max_new_tokens")


def test_short_histories_do_not_fire_and_say_why():
    report = assess(history([2.5, 2.4], {2: 2.45}), GOOD)
    assert report.healthy
    assert "not enough" in next(s for s in report.signs if s.name == "overfitting").summary
    json.dumps(report.summary())  # W&B summary values must be plain JSON


def test_curves_png_and_table():
    png = plot_curves(HEALTHY)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = curves_table(HEALTHY)
    assert "| 10 | 2.2300 | 2.3000 | 5.00e-05 |" in table
