"""What `smolflow eval` (flows/evaluate.py) refuses before it runs: settings of stages it does not
run, and a model without the chat template the judge or a custom benchmark needs. Kept out of the
flow's module, so that a refused `smolflow eval` answers before Prefect is imported."""

from __future__ import annotations

from tasks.checks import check_chat_template
from tasks.config import RunConfig
from tasks.config_base import unused
from tasks.config_eval import NOT_IN_EVAL


def check_eval_settings(config: RunConfig) -> None:
    """smolflow eval scores a model and trains nothing: a setting of a stage it does not run (data,
    template, training, samples, gate, hub push, a model for W&B), moved off its default, would have
    no effect, so it is refused, naming it (ValueError). Retention (output.keep_*) and W&B apply."""
    scoring_only = "smolflow eval scores a model and trains nothing, so it has no {} (smolflow run does)"
    what = {"data": "training data", "template": "chat template to apply", "training": "training",
            "gate": "promotion gate", "sampling": "before/after samples", "output": "new model to push",
            "wandb": "new model to log"}
    judge_reads_prompts = config.judge.enabled and config.judge.instructions == "samples"
    for section, fields in NOT_IN_EVAL.items():
        part = getattr(config, section)
        fields = tuple(type(part).model_fields) if fields is None else fields
        if section == "sampling" and not judge_reads_prompts:
            fields += ("prompts",)
        why = scoring_only.format(what[section]) + ("; sampling.prompts serves only as the judge's instructions "
                                                    "(judge.instructions: samples)" if section == "sampling" else "")
        unused(part, fields, f"{section}.", why)
    judge = config.judge
    if judge.enabled and judge.reference == "base":
        from tasks.models import resolve_source

        if resolve_source(config.model) == resolve_source("auto"):  # the flow skips the judge (its own reference)
            unused(judge, tuple(n for n in type(judge).model_fields if n not in ("enabled", "reference")), "judge.",
                   f"the judge is skipped: model={config.model!r} is the default model, the judge's reference "
                   "(judge.reference: base); set judge.reference to a file of reference outputs, or judge.enabled: false")


def check_eval_template(config: RunConfig, custom: list) -> None:
    """The evaluated model answers the judge's instructions, and the custom benchmarks with
    chat_template: true, through its chat template: a model without one (a base model) failed there,
    after the benchmarks before it, in transformers' words. Said before any model runs, naming what needs it."""
    needs, fixes = [], []
    if config.judge.enabled:
        needs.append("the judge's instructions (judge.enabled: true)")
        fixes.append("judge.enabled: false")
    if chat := [b for b in custom if b.chat_template]:
        needs += [f"custom benchmark {b.name!r} (chat_template: true in {b.path})" for b in chat]
        fixes.append("chat_template: false in " + ("that definition" if len(chat) == 1 else "those definitions"))
    if needs:
        check_chat_template(config.model, "model", f"answer {' or '.join(needs)}; evaluate a model with a chat "
                            f"template, or set {' and '.join(fixes)}")
