"""On a CUDA machine: the seed's configuration at full size, then the published benchmark profile.

    python scripts/gpu_run.py                          # SmolLM2-135M, 1000 steps, bf16, full benchmarks
    python scripts/gpu_run.py --steps 50 --limit 100   # a quick look
    python scripts/gpu_run.py --backend vllm           # score with lm-eval's vLLM backend (vllm installed)

Trains with smolflow's own SFT settings (tasks/training.py sft_config; execution device cuda,
precision bf16 where the GPU supports it) on the seed's data (HuggingFaceTB/smoltalk
everyday-conversations online, the shipped fixture offline), then scores the tuned model on each
benchmark at its reference setting (MMLU cloze 0-shot, BBH 3-shot, GSM8K 5-shot, MATH-500 Minerva
4-shot, HumanEval 0-shot: SmolLM2's published profile, docs/benchmarks.md). Prints training
tokens/s and MFU (model FLOPs, 6N per token, against a bf16 matmul peak measured on the same GPU)
and seconds per benchmark; writes everything to --out as JSON. Without CUDA it stops at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROFILE = ("mmlu", "bbh", "gsm8k", "math", "humaneval")


def require_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"gpu_run.py needs a CUDA GPU, and torch {torch.__version__} sees none "
                 f"(CUDA build: {torch.version.cuda or 'no, a CPU-only torch'}). Run it on a GPU machine "
                 "with a CUDA build of torch; on CPUs use scripts/bench_training.py instead.")
    return torch.cuda.get_device_name(0)


def gpu_peak_flops(dtype_name: str, n: int = 8192, reps: int = 10) -> float:
    """Best matmul FLOP/s on this GPU in the training dtype: the MFU denominator."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def train(args, placement, out_dir: Path) -> dict:
    """The seed's SFT run (batch 4, lr 5e-5, `steps` steps) with smolflow's settings, timed per token."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from tasks.config import DataConfig, TrainingConfig
    from tasks.data import load_chat_dataset
    from tasks.models import load_model, resolve_model
    from tasks.training import prepare_splits, sft_config

    base = resolve_model.fn(args.model)
    model, tokenizer = load_model(base, as_stored=True)
    cfg = TrainingConfig(max_steps=args.steps, logging_steps=25, eval_steps=max(1, args.steps // 4),
                         save_steps=10 ** 9)
    data = load_chat_dataset.fn(DataConfig())
    from datasets import load_from_disk

    splits = load_from_disk(data.path)
    train_ds, test_ds = prepare_splits(splits, tokenizer, cfg)
    marks: list[tuple[float, int]] = []

    class Counting(SFTTrainer):
        tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            import torch

            torch.cuda.synchronize()
            marks.append((time.perf_counter(), trainer.tokens))

    trainer = Counting(model=model, args=sft_config(cfg, str(out_dir / "checkpoints"), [], placement,
                                                    save_strategy="no"),
                       train_dataset=train_ds, eval_dataset=test_ds, processing_class=tokenizer, callbacks=[Clock()])
    output = trainer.train()
    warm = min(10, len(marks) - 1)  # the first steps include CUDA start-up and kernel selection
    (t0, n0), (t1, n1) = marks[warm], marks[-1]
    tokens_per_s = (n1 - n0) / (t1 - t0)
    params = sum(p.numel() for p in model.parameters())
    peak = gpu_peak_flops(placement.precision)
    trainer.save_model(str(out_dir / "model"))
    tokenizer.save_pretrained(str(out_dir / "model"))
    return {"model": args.model, "steps": trainer.state.global_step, "train_loss": output.training_loss,
            "eval_loss": trainer.evaluate()["eval_loss"], "tokens_per_s": tokens_per_s,
            "mfu": 6 * params * tokens_per_s / peak, "matmul_peak_tflops": peak / 1e12,
            "train_runtime_s": output.metrics["train_runtime"], "precision": placement.precision}


def score(args, placement, model_dir: Path) -> list[dict]:
    """Each benchmark of the profile at its reference setting; seconds per benchmark."""
    from tasks.benchmarks import REGISTRY
    from tasks.config import BenchmarkConfig
    from tasks.models import load_model, resolve_model

    rows = []
    ref = resolve_model.fn(str(model_dir))
    model = tokenizer = None
    for name in args.benchmarks:
        cfg = BenchmarkConfig(name=name, limit=args.limit, batch_size=args.batch_size)
        started = time.perf_counter()
        if args.backend == "vllm":
            from lm_eval.models.vllm_causallms import VLLM

            lm = VLLM(pretrained=str(model_dir), dtype="bfloat16" if placement.precision == "bf16" else "float32",
                      batch_size="auto")
            result = REGISTRY[name].evaluate_lm(lm, cfg)
            del lm
        else:
            if model is None:
                model, tokenizer = load_model(ref, placement=placement)
                model.eval()
            result = REGISTRY[name].evaluate(model, tokenizer, cfg)
        seconds = time.perf_counter() - started
        rows.append({"benchmark": name, "n": result.n, "score": result.score, "seconds": seconds,
                     "s_per_item": seconds / max(1, result.n), "backend": args.backend})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto", help="'auto': HuggingFaceTB/SmolLM2-135M online, the built-in offline")
    p.add_argument("--steps", type=int, default=1000, help="training steps (the seed: 1000)")
    p.add_argument("--limit", type=int, default=None, help="items per benchmark (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--benchmarks", nargs="+", default=list(PROFILE), choices=PROFILE)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="lm-eval backend for scoring")
    p.add_argument("--out", default="gpu_run.json")
    args = p.parse_args()
    gpu = require_cuda()

    from tasks.config import ExecutionConfig
    from tasks.device import publish

    placement = publish(ExecutionConfig(device="cuda"))  # bf16 where the GPU supports it
    print(f"GPU: {gpu}; {placement.precision} ({placement.reason})", flush=True)
    out_dir = Path(args.out).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    training = train(args, placement, out_dir)
    print(json.dumps(training), flush=True)
    benchmarks = score(args, placement, out_dir / "model")
    Path(args.out).write_text(json.dumps({"gpu": gpu, "training": training, "benchmarks": benchmarks}, indent=2))
    print(f"\nGPU {gpu}: {training['tokens_per_s']:.0f} training tokens/s, MFU {training['mfu']:.1%} "
          f"({training['precision']}, {training['steps']} steps, eval loss {training['eval_loss']:.4f})")
    print("| benchmark | n | score | seconds | s/item |\n|---|---|---|---|---|")
    for r in benchmarks:
        print(f"| {r['benchmark']} | {r['n']} | {r['score']:.3f} | {r['seconds']:.0f} | {r['s_per_item']:.3f} |")


if __name__ == "__main__":
    main()
