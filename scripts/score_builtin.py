"""Score the real SmolLM2-135M-Instruct (the built-in offline model) on a few items of every
benchmark, on the shipped fixtures, and print score, settings and seconds per item.

    python scripts/score_builtin.py [--limit 10] [--benchmarks mmlu bbh gsm8k math humaneval]

These are smoke-level numbers (10 items: a 95% interval of about +-30 points); they show the
pipeline runs end to end on the real model, not the model's true scores. docs/benchmarks.md
records one run next to the published figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from tasks.config import BENCHMARKS, BenchmarkConfig  # noqa: E402

# Few subsets so that 10 items are 10 items, not 10 per subject/task.
SUBSETS = {"mmlu": ["high_school_mathematics", "astronomy", "high_school_biology"], "bbh": ["boolean_expressions", "object_counting", "web_of_lies"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=10, help="items per benchmark (per subset for MMLU/BBH: split evenly)")
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from tasks.benchmarks import REGISTRY
    from tasks.models import convert_builtin, load_model, resolve_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(resolve_model.fn(str(convert_builtin())))
    model.eval()
    rows = []
    for name in args.benchmarks:
        subsets = SUBSETS.get(name)
        limit = -(-args.limit // len(subsets)) if subsets else args.limit
        cfg = BenchmarkConfig(name=name, limit=limit, subsets=subsets, data="fixture", batch_size=args.batch_size)
        started = time.perf_counter()
        result = REGISTRY[name].evaluate(model, tokenizer, cfg)
        seconds = time.perf_counter() - started
        row = {
            "benchmark": name,
            "metric": result.metric,
            "n": result.n,
            "correct": sum(r["correct"] for r in result.records),
            "score": round(result.score, 3),
            "s_per_item": round(seconds / result.n, 2),
            "settings": {k: result.settings.get(k) for k in ("num_fewshot", "apply_chat_template", "generation_kwargs", "stock_task")},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| benchmark | metric | n | correct | score | s/item |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['metric']} | {r['n']} | {r['correct']} | {r['score']:.3f} | {r['s_per_item']} |")


if __name__ == "__main__":
    main()
