"""What a run measures besides the loss: the benchmarks (one section each, or a named profile) and
the AlpacaEval-style judge."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.config_base import JudgeEndpoint, Section

BENCHMARKS = ("mmlu", "bbh", "gsm8k", "math", "humaneval")  # one module each in tasks/benchmarks/
# How a benchmark splits into Ray tasks (tasks/evaluation.py shards / item_parts): by subset, or by item.
BY_SUBSET, BY_ITEM = ("mmlu", "bbh"), ("gsm8k", "math", "humaneval")

class BenchmarkConfig(Section):
    """One benchmark to score the base and the tuned model on."""

    name: Literal[BENCHMARKS] = Field("gsm8k", description=f"One of: {', '.join(BENCHMARKS)}.")
    limit: int | None = Field(
        10, ge=1,
        description="Score at most this many items; for MMLU and BBH per subject/task, as lm-eval's --limit "
        "(10 on MMLU's 57 subjects: up to 570 items). None: all.",
    )
    num_fewshot: int | None = Field(None, ge=0, description="None: the benchmark's reference setting.")
    data: str = Field(
        "auto",
        description="Hub dataset id, a local directory/file in the hub schema, or 'fixture'. "
        "'auto': the hub online, the shipped fixture offline.",
    )
    batch_size: int = Field(
        8, ge=1,
        description="Items scored per forward pass. lm-eval generation (GSM8K, BBH, MATH) gains from 32 "
        "(docs/performance.md); the `published` profile sets it.",
    )
    subsets: list[str] | None = Field(
        None,
        min_length=1,
        description="MMLU subjects (e.g. high_school_physics) or BBH tasks (e.g. boolean_expressions) to "
        "score; limit then applies per subset. None: every subset in the data.",
    )
    format: Literal["cloze", "mcq"] | None = Field(
        None,
        description="MMLU only. 'cloze': each choice's text scored (lm-eval mmlu/continuation, acc_norm; "
        "the SmolLM2 card's setting); 'mcq': lettered A-D (lm-eval's default `mmlu` task, acc). None: cloze.",
    )
    variant: Literal["answer_only", "cot"] | None = Field(
        None,
        description="BBH only. 'answer_only': lm-eval bbh/fewshot (3-shot); 'cot': bbh/cot_fewshot "
        "(3-shot chain of thought, exact_match,get-answer). None: answer_only.",
    )

    @field_validator("subsets")
    @classmethod
    def _each_once(cls, value: list[str] | None) -> list[str] | None:
        # a subset named twice was scored twice: its items counted twice in the score, n and stderr
        twice = sorted({s for i, s in enumerate(value or []) if s in value[:i]})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} listed more than once; name each subset once")
        return value

    @model_validator(mode="after")
    def _settings_apply(self) -> BenchmarkConfig:
        # A setting the benchmark would ignore is an error, not a silent no-op.
        if self.format is not None and self.name != "mmlu":
            raise ValueError(f"format: only mmlu has a format (cloze | mcq); remove it from {self.name}")
        if self.variant is not None and self.name != "bbh":
            raise ValueError(f"variant: only bbh has a variant (answer_only | cot); remove it from {self.name}")
        if self.name == "humaneval" and self.num_fewshot not in (None, 0):
            raise ValueError(f"num_fewshot: humaneval is 0-shot; got {self.num_fewshot}, leave it unset")
        return self


# Named benchmark lists accepted wherever a list is (`benchmarks: published`). `published` is the
# SmolLM2-135M-Instruct model card's setting: MMLU cloze over all 57 subjects (0-shot), BBH 3-shot
# answer-only over all 27 tasks, GSM8K 5-shot, every item, from the hub. `published:DIR` reads local
# mirrors in the hub schema instead: DIR/mmlu, DIR/bbh, DIR/gsm8k. Generation runs 32 rows a batch,
# where smolflow-hf is fastest (docs/performance.md); the batch size never changes a score.
PROFILES: dict[str, list[dict]] = {
    "published": [
        {"name": "mmlu", "format": "cloze", "num_fewshot": 0, "limit": None},
        {"name": "bbh", "variant": "answer_only", "num_fewshot": 3, "limit": None, "batch_size": 32},
        {"name": "gsm8k", "num_fewshot": 5, "limit": None, "batch_size": 32},
    ],
}


def expand_benchmarks(value):
    """A profile name ('published' or 'published:DIR') -> its list of benchmark settings; lists pass."""
    if not isinstance(value, str):
        return value
    name, _, folder = value.partition(":")
    if name not in PROFILES:
        raise ValueError(f"benchmarks: unknown profile {value!r}; give a list, or one of {', '.join(PROFILES)}")
    if folder:
        root = Path(folder).expanduser()
        return [b | {"data": str(root / b["name"])} for b in PROFILES[name]]
    return [b | {"data": "hub"} for b in PROFILES[name]]


class JudgeConfig(JudgeEndpoint):
    """AlpacaEval-style pairwise judge: the tuned model's answers against a reference's."""

    enabled: bool = Field(True, description="Judge the tuned model's answers (both orders per pair).")
    instructions: str = Field(
        "samples",
        description="'samples': the run's sample prompts; 'fixture': the shipped AlpacaEval-style set; "
        "or a local .json/.jsonl file in AlpacaEval's schema (`instruction` per row).",
    )
    reference: str = Field(
        "base",
        description="'base': the base model's answers; or a local .json/.jsonl file with "
        "`instruction` and `output` per row (AlpacaEval's reference outputs).",
    )
    limit: int | None = Field(None, ge=1, description="Judge at most this many instructions.")
    max_new_tokens: int | None = Field(
        None, ge=1, le=4096,
        description="Answer length. None: sampling.max_new_tokens, so the run's own samples are judged as they are.",
    )


# The settings of the stages `smolflow eval` does not run (a whole section, or some of its fields):
# refused there when moved off their defaults (tasks/checks_eval.py check_eval_settings) and left out
# of `smolflow eval --help`. sampling.prompts stays: it is the judge's instructions by default.
NOT_IN_EVAL: dict[str, tuple[str, ...] | None] = {
    "data": None, "template": None, "training": None, "gate": None, "sampling": ("max_new_tokens",),
    "output": ("push_to_hub", "hub_token_secret", "hub_private"), "wandb": ("log_model",)}


def as_run(config, leave_out: dict | None = None) -> dict:
    """The config as a flow ran it (JSON), less the sections and fields it does not run (eval:
    NOT_IN_EVAL, whose defaults its config.json, report and W&B listed as if it had trained)."""
    dumped = config.model_dump(mode="json")
    for section, fields in (leave_out or {}).items():  # None: the whole section
        for field in () if fields is None else fields:
            dumped.get(section, {}).pop(field, None)
        if fields is None:
            dumped.pop(section, None)
    return dumped


def resolved_in(resolved: dict[str, str], leave_out: dict | None) -> dict[str, str]:
    """resolve_autos' answers less those of the sections a flow leaves out whole (eval: NOT_IN_EVAL)."""
    return {k: v for k, v in resolved.items() if (leave_out or {}).get(k.split(".")[0].split("[")[0], ()) is not None}
