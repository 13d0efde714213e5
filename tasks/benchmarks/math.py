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
    when Prefect runs the task in a worker thread; so only math-verify is kept."""
    from tasks.mathcheck import check

    return {"math_verify": int(check(doc["solution"], results[0])[0])}


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
            "metric_list": [{"metric": "math_verify", "aggregation": "mean", "higher_is_better": True}],
        }

    def record(self, sample: dict, key: str) -> dict[str, Any]:
        from tasks.mathcheck import check

        row = super().record(sample, key)
        extracted = check(sample["doc"]["solution"], row["output"] or "")[1]
        return row | {"extracted": extracted, "gold": sample["doc"]["solution"]}
