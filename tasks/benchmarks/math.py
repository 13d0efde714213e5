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
    """math-verify with its signal timeouts off. The stock function also does so with timeouts
    on, and its Minerva exact match uses signal.alarm too, which silently scores 0 when Prefect
    runs the task in a worker thread; so only math-verify is kept."""
    from math_verify import parse, verify

    gold = parse(doc["solution"], parsing_timeout=None)
    pred = parse(results[0], parsing_timeout=None)
    return {"math_verify": int(verify(gold, pred, timeout_seconds=None))}


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
    extraction = "math-verify: last \\boxed{} / final answer of the output vs the gold solution's"

    def overrides(self) -> dict[str, Any]:
        return {
            "process_results": process_results,
            "metric_list": [{"metric": "math_verify", "aggregation": "mean", "higher_is_better": True}],
        }

    def record(self, sample: dict, key: str) -> dict[str, Any]:
        from math_verify import parse

        row = super().record(sample, key)
        parsed = parse(row["output"] or "", parsing_timeout=None)
        return row | {"extracted": str(parsed[-1]) if parsed else None, "gold": sample["doc"]["solution"]}
