"""Scorers of custom benchmarks: does one model output match one gold answer?

Each scorer is a small function `(output: str, gold, **args) -> bool`, registered in `SCORERS`
with the pydantic model of the `scorer_args` it takes (`ARGS`, unknown keys rejected) and, where
it pulls an answer out of the output, an extractor (`EXTRACTORS`) whose result goes into each
record's `extracted`. A gold is a string or a number; an item may list several acceptable golds
(custom.py scores it correct when any matches).

`judge_rubric` is different: one judge call per item is slow, so `judge_verdicts` asks the judge
backend about every item at once and `parse_verdict` reads each reply (None: unparseable, scored as
a failure and counted).
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt argument must not be silently ignored


class NoArgs(_Args):
    pass


class ContainsArgs(_Args):
    case_sensitive: bool = Field(False, description="Compare case as well.")


class RegexArgs(_Args):
    pattern: str = Field(description="Python regex; the last match in the output is the answer.")
    group: int | str = Field(1, description="Group holding the answer: a number (0 = whole match) or a name.")
    ignore_case: bool = Field(True, description="Match the pattern case-insensitively.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"bad regex {pattern!r}: {err.msg} at position {err.pos}; fix the pattern "
                "(in YAML, single-quote it so backslashes stay as written)"
            ) from None
        return pattern

    @model_validator(mode="after")
    def _group_exists(self) -> RegexArgs:
        compiled = re.compile(self.pattern)
        if isinstance(self.group, int) and self.group > compiled.groups:
            raise ValueError(
                f"group {self.group}: the pattern {self.pattern!r} has only {compiled.groups} group(s); "
                "add a (...) group around the answer or set group: 0 for the whole match"
            )
        if isinstance(self.group, str) and self.group not in compiled.groupindex:
            raise ValueError(f"group {self.group!r}: no (?P<{self.group}>...) group in the pattern {self.pattern!r}")
        return self


class NumericArgs(_Args):
    tolerance: float = Field(0.0, ge=0, description="Largest accepted difference (absolute, or relative to the gold).")
    relative: bool = Field(False, description="Read tolerance as a fraction of |gold|.")


class JudgeArgs(_Args):
    rubric: str = Field(min_length=1, description="What a passing answer must do, in plain words.")
    max_new_tokens: int = Field(16, ge=1, le=1024, description="Length of the judge's reply.")


# --- normalisation and extraction ------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def normalize(text: str) -> str:
    """SQuAD v1.1's normalize_answer: lowercase, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def parse_number(text: Any) -> float | None:
    """The last number written in `text` ("1,234.5", "-3", "2e3"), or None."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    found = _NUMBER.findall(str(text))
    return float(found[-1].replace(",", "")) if found else None


def regex_extract(output: str, pattern: str, group: int | str = 1, ignore_case: bool = True) -> str | None:
    # The last match: models tend to restate the question before they answer it.
    matches = list(re.finditer(pattern, output, re.IGNORECASE if ignore_case else 0))
    return matches[-1].group(group) if matches else None


def math_extract(output: str) -> str | None:
    from tasks.mathcheck import check

    return check("", output)[1]


# --- scorers: (output, gold, **args) -> bool -------------------------------------------------


def exact_match(output: str, gold, **_) -> bool:
    return output.strip() == str(gold).strip()


def normalized_match(output: str, gold, **_) -> bool:
    return normalize(output) == normalize(gold)


def contains(output: str, gold, case_sensitive: bool = False, **_) -> bool:
    if case_sensitive:
        return str(gold).strip() in output
    return str(gold).strip().lower() in output.lower()


def regex(output: str, gold, pattern: str, group: int | str = 1, ignore_case: bool = True, **_) -> bool:
    found = regex_extract(output, pattern, group, ignore_case)
    return found is not None and normalize(found) == normalize(gold)


def numeric(output: str, gold, tolerance: float = 0.0, relative: bool = False, **_) -> bool:
    value, target = parse_number(output), parse_number(gold)
    if value is None or target is None:
        return False
    return abs(value - target) <= (tolerance * abs(target) if relative else tolerance)


def math_verify(output: str, gold, **_) -> bool:
    from tasks.benchmarks.math import process_results  # the MATH benchmark's check: gold first, timeouts off

    return bool(process_results({"solution": str(gold)}, [output])["math_verify"])


# --- judge with a rubric ---------------------------------------------------------------------

JUDGE_TEMPLATE = """You are grading an answer to a question against a rubric.

Question:
{question}

Reference answer:
{gold}

Rubric:
{rubric}

Answer to grade:
{output}

Does the answer to grade satisfy the rubric? Reply with one word: PASS or FAIL."""

_VERDICT = re.compile(r"\b(PASS|FAIL)\b", re.IGNORECASE)


def judge_prompt(question: str, output: str, gold, rubric: str) -> str:
    return JUDGE_TEMPLATE.format(question=question, gold=gold, rubric=rubric, output=output)


def parse_verdict(reply: str) -> bool | None:
    """True for PASS, False for FAIL (the first one written), None when the reply has neither."""
    found = _VERDICT.search(reply or "")
    return None if found is None else found.group(1).upper() == "PASS"


def judge_verdicts(backend, questions: list[str], outputs: list[str], golds: list, rubric: str,
                   max_new_tokens: int = 16) -> list[tuple[str, bool | None]]:
    """(raw reply, parsed verdict) per item, every item in one call to the judge backend."""
    prompts = [judge_prompt(q, o, g, rubric) for q, o, g in zip(questions, outputs, golds)]
    replies = backend.chat([[{"role": "user", "content": p}] for p in prompts], max_new_tokens)
    return [(r, parse_verdict(r)) for r in replies]


def judge_rubric(output: str, gold, rubric: str, judge=None, question: str = "", max_new_tokens: int = 16,
                 **_) -> bool:
    """One item through the judge (custom.py batches them through judge_verdicts instead)."""
    if judge is None:
        raise ValueError("scorer judge_rubric needs a judge backend (tasks.judge.make_backend(config.judge))")
    return judge_verdicts(judge, [question], [output], [gold], rubric, max_new_tokens)[0][1] is True


SCORERS: dict[str, Callable[..., bool]] = {
    "exact_match": exact_match,
    "normalized_match": normalized_match,
    "contains": contains,
    "regex": regex,
    "numeric": numeric,
    "math_verify": math_verify,
    "judge_rubric": judge_rubric,
}
ARGS: dict[str, type[_Args]] = {
    "exact_match": NoArgs,
    "normalized_match": NoArgs,
    "contains": ContainsArgs,
    "regex": RegexArgs,
    "numeric": NumericArgs,
    "math_verify": NoArgs,
    "judge_rubric": JudgeArgs,
}
EXTRACTORS: dict[str, Callable[..., Any]] = {
    "exact_match": lambda output, **_: output.strip(),
    "normalized_match": lambda output, **_: normalize(output),
    "contains": lambda output, **_: output.strip(),
    "regex": lambda output, pattern, group=1, ignore_case=True, **_: regex_extract(output, pattern, group, ignore_case),
    "numeric": lambda output, **_: parse_number(output),
    "math_verify": lambda output, **_: math_extract(output),
    "judge_rubric": lambda output, **_: output.strip(),
}


def gold_problem(scorer: str, gold) -> str | None:
    """Why a gold answer can never be matched by this scorer, or always would be (None: neither)."""
    if isinstance(gold, str) and not gold.strip():
        return f"answer {gold!r} is empty: every output contains it, and only an empty one equals it; write the answer"
    if scorer == "numeric" and parse_number(gold) is None:
        return f"answer {gold!r} holds no number, which the numeric scorer needs"
    if scorer == "math_verify":
        from math_verify import parse

        if not parse(str(gold), parsing_timeout=None):
            return f"math-verify finds no answer in {gold!r}; write it as a number or LaTeX in $...$"
    return None
