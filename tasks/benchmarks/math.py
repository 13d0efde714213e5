"""MATH: competition problems (Hendrycks et al. 2021) with LaTeX solutions ending in \\boxed{}.

lm-eval's stock `minerva_math` format (Lewkowycz et al. 2022): 4-shot "Problem:/Solution:"
prompts with Minerva's fixed examples, greedy, stop at "Problem:"; the 4-shot setting is the one
SmolLM2's model cards quote for MATH. An answer is checked with math-verify against the gold
solution: `verify(parse(gold), parse(output))`, gold first, so \\frac12, 0.5 and 1/2 all match.
"""

from __future__ import annotations

from typing import Any

from tasks.benchmarks.base import LmEvalBenchmark


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """math-verify, under a time limit in a child process (tasks/mathcheck.py). The stock function
    uses signal timeouts, and its Minerva exact match signal.alarm too, which silently scores 0
    when Prefect runs the task in a worker thread; so only math-verify is kept. `check_timed_out`:
    the check passed its limit and the answer counts wrong (their share: how much load moved the score)."""
    from tasks import mathcheck

    correct = mathcheck.check(doc["solution"], results[0], mathcheck.LIMIT_S)[0]
    return {"math_verify": int(correct), "check_timed_out": int(mathcheck.gave_up(doc["solution"], results[0],
                                                                                 mathcheck.LIMIT_S))}


class MATH(LmEvalBenchmark):
    name = "math"
    hub = ("HuggingFaceH4/MATH-500", "default")
    fixture = "math"
    stock_yaml = "minerva_math/minerva_math500.yaml"
    metric = "math_verify,none"
    reference = "Minerva MATH format, 4-shot, no chat template (SmolLM2 model cards: MATH 4-shot); lm-eval minerva_math"
    full_items = 500
    cost_per_item = 6.0
    reference_shots = 4
    row_fields = ("problem", "solution")  # the prompt, and the gold that process_results checks against
    extraction = "math-verify: last \\boxed{} / final answer of the output vs the gold solution's"

    def overrides(self) -> dict[str, Any]:
        return {
            "process_results": process_results,
            "metric_list": [{"metric": "math_verify", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "check_timed_out", "aggregation": "mean", "higher_is_better": False}],
        }

    def record(self, sample: dict, key: str) -> dict[str, Any]:
        from tasks import mathcheck

        row = super().record(sample, key)
        gold, output = sample["doc"]["solution"], row["output"] or ""
        extracted = mathcheck.check(gold, output, mathcheck.LIMIT_S)[1]
        return row | {"extracted": extracted, "gold": gold,
                      "check_timed_out": mathcheck.gave_up(gold, output, mathcheck.LIMIT_S)}

    def result(self, cfg, specs, shots, out, files, seconds, dtype=None, how=None):
        """The lm-eval result, with the answer check's limit; a warning names the answers it cut off."""
        from tasks import mathcheck
        from tasks.runtime import run_logger

        result = super().result(cfg, specs, shots, out, files, seconds, dtype, how)
        result.settings["answer_check"] = (f"math-verify in a child process, {mathcheck.LIMIT_S:g} s per answer; an "
                                           "answer whose check passes it counts wrong (their share: check_timed_out)")
        if cut := sum(r["check_timed_out"] for r in result.records):
            run_logger().warning("math: %d of %d answers' checks passed %g s and count wrong; a busy machine scores "
                                 "lower (metric check_timed_out)", cut, result.n, mathcheck.LIMIT_S)
        return result
