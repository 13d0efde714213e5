"""GSM8K: grade-school math word problems, answer after '#### ' (openai/gsm8k, config main)."""

from tasks.benchmarks.base import LmEvalBenchmark


class GSM8K(LmEvalBenchmark):
    name = "gsm8k"
    hub = ("openai/gsm8k", "main")
    fixture = "gsm8k"
    stock_yaml = "gsm8k/gsm8k.yaml"
    # lm-eval's stock task: 5-shot "Question: ...\nAnswer:" prompts, greedy, stop at "Question:";
    # strict-match reads the number after "#### ", as the dataset's gold answers write it.
    metric = "exact_match,strict-match"
    reference = "lm-eval gsm8k v3 (5-shot, no chat template), as in the Open LLM Leaderboard v1"
