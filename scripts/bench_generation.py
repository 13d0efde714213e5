"""Batched vs one-prompt-at-a-time generation on the same items and the same model.

    python scripts/bench_generation.py [--workload gsm8k|chat] [--items 16] [--batch-sizes 1 8 16] [--threads 2]

gsm8k: GSM8K (the shipped fixture, 5-shot, lm-eval's stock task: the path the flow uses), long
few-shot prompts. chat: the judge fixture's instructions through the chat template with
`tasks.generation.generate` (the samples', judge's and custom benchmarks' path), short prompts and
64 new tokens. Runs the real SmolLM2-135M-Instruct once per batch size, in this one process, and
prints seconds per item, the speed-up over batch size 1 (the seed's style: one `generate` call per
prompt) and how many greedy outputs agree with the batch-1 ones.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def chat_prompts(n: int) -> list[str]:
    """n short chat instructions (the judge fixture's, repeated as needed)."""
    import json

    from tasks.judge import FIXTURE_INSTRUCTIONS

    rows = [json.loads(line)["instruction"] for line in FIXTURE_INSTRUCTIONS.read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workload", choices=["gsm8k", "chat"], default="gsm8k")
    args = parser.parse_args()

    import torch

    from tasks.config import BenchmarkConfig
    from tasks.benchmarks import REGISTRY
    from tasks.generation import generate
    from tasks.models import convert_builtin, load_model, resolve_model

    torch.set_num_threads(args.threads)
    convert_builtin()
    model, tokenizer = load_model(resolve_model.fn("builtin:smollm2-135m-instruct"))
    model.eval()
    print(f"{args.workload}, {args.items} items, SmolLM2-135M-Instruct fp32, {args.threads} torch threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows, baseline, reference = [], None, None
    for bs in args.batch_sizes:
        started = time.perf_counter()
        if args.workload == "gsm8k":
            result = REGISTRY["gsm8k"].evaluate(model, tokenizer, BenchmarkConfig(name="gsm8k", limit=args.items, batch_size=bs))
            outputs, score = [r["output"] for r in result.records], result.score
        else:
            samples = generate(model, tokenizer, chat_prompts(args.items), 64, batch_size=bs)
            outputs, score = [s.completion for s in samples], float("nan")
        seconds = time.perf_counter() - started
        baseline = baseline or seconds
        reference = reference or outputs
        same = sum(a == b for a, b in zip(outputs, reference))
        rows.append((bs, seconds, seconds / len(outputs), baseline / seconds, same, len(outputs), score))
    print("\n| batch size | seconds | s/item | speed-up vs batch 1 | outputs equal to batch 1 | score |")
    print("|---|---|---|---|---|---|")
    for bs, seconds, per_item, ratio, same, n, score in rows:
        print(f"| {bs} | {seconds:.1f} | {per_item:.2f} | {ratio:.2f}x | {same}/{n} | {score:.3f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
