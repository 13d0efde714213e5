"""How often bf16 alone changes lm-eval's own outputs: HFLM in bf16 at two batch sizes, side by side.

    python scripts/bf16_agreement.py --case mmlu     # 100 MMLU questions, cloze 0-shot
    python scripts/bf16_agreement.py --case gsm8k    # 32 GSM8K items, 5-shot greedy generation

The yardstick for smolflow-hf's agreement with HFLM in bf16 (docs/performance.md): the same
engine and model, only the batch size differs, so every difference is bf16 rounding in
differently shaped batches. Data as in scripts/bench_eval.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["mmlu", "gsm8k"], required=True)
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=[8, 1])
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from scripts.bench_eval import agreement, build_data
    from tasks.benchmarks import REGISTRY
    from tasks.config import BenchmarkConfig
    from tasks.models import convert_builtin, load_model, resolve_model

    torch.set_num_threads(1)
    convert_builtin()
    model, tokenizer = load_model(resolve_model.fn("builtin:smollm2-135m-instruct"))
    model = model.to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as tmp:
        if args.case == "mmlu":
            source, subsets, limit = build_data(Path(tmp), 100, mmlu_per_subject=50)["mmlu"]
            cfg = BenchmarkConfig(name="mmlu", limit=limit, num_fewshot=0, data=source, subsets=subsets)
        else:
            source, _, limit = build_data(Path(tmp), 32)["gsm8k"]
            cfg = BenchmarkConfig(name="gsm8k", limit=limit, num_fewshot=5, data=source)
        a, b = (REGISTRY[args.case].evaluate_lm(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=size,
                                                     device=str(model.device)), cfg)
                for size in args.batch_sizes)
    same, gap = agreement(a, b)
    delta = sum(r["correct"] for r in b.records) - sum(r["correct"] for r in a.records)
    print(f"{args.case}: HFLM bf16 at batch {args.batch_sizes[0]} vs {args.batch_sizes[1]}: identical {same}/{a.n} "
          f"({100 * same / a.n:.0f}%), max Δ loglik {gap:.1e}, Δ score {delta:+d} items")


if __name__ == "__main__":
    main()
