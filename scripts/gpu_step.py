"""Where a training step's time goes on a GPU: one change at a time, from a bare loop to TRL's Trainer.

    python scripts/gpu_step.py                 # on a CUDA machine (through gpu_device.sh: GPU_SCRIPT=scripts/gpu_step.py)
    python scripts/gpu_step.py --device cpu    # checks the script where no GPU is (tests/test_gpu_step.py)

On the first GPU lent (docs/performance.md#gpu) smolflow's Trainer step took 0.45 s, 4x a bare PyTorch
step of the same model and tokens, with the GPU idle most of the time. Each row here adds one thing
to the row above, on the same four fixture conversations, bf16 autocast over fp32 weights and fused
AdamW, as the Trainer trains:
  bare padded          4 rows padded to the longest, transformers' SDPA, the model's own loss
  packed sdpa          one padding-free row (TRL's collator), transformers' SDPA over a block-diagonal mask
  packed smolflow      smolflow's per-sequence attention (tasks/packed_attention.py)
  + TRL LM head        TRL's fused LM head (Triton kernels on a GPU), its loss, entropy and top-1 outputs
  + TRL metrics        the .item() reads TRL's compute_loss makes every step
and two more: transformers' SDPA with TRL's head and metrics (what smolflow's Trainer runs on a GPU
since the first rows were measured), and the same with SDPA's cuDNN kernel left out (the Trainer's
remaining cuDNN calls cost ~0.5-0.8 ms of host time each on new sequence lengths). Then gpu_run.py's
Trainer steps (smolflow's SFTConfig, and the seed's), each profiled. Per row: ms a step (median),
and from torch's profiler the kernel launches, host-device syncs, cudaMalloc/cudaFree
calls and busy device ms a step. Not a test; numbers go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# row: (batch, attention, TRL's LM head, TRL's metric reads, cuDNN attention allowed)
ROWS = {
    "bare padded": ("padded", "sdpa", False, False, True),
    "packed sdpa": ("packed", "sdpa", False, False, True),
    "packed smolflow": ("packed", "smolflow-packed", False, False, True),
    "+ TRL LM head": ("packed", "smolflow-packed", True, False, True),
    "+ TRL metrics": ("packed", "smolflow-packed", True, True, True),
    "packed sdpa, TRL head and metrics": ("packed", "sdpa", True, True, True),
    "the same, cuDNN attention off": ("packed", "sdpa", True, True, False),
}
def batches(tokenizer, rows: int = 4) -> dict:
    """The fixture's first `rows` training conversations, collated as the Trainer does: padded, or padding-free."""
    from datasets import load_from_disk
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tasks.config import DataConfig, TrainingConfig
    from tasks.data import load_chat_dataset
    from tasks.training import prepare_splits

    splits = load_from_disk(load_chat_dataset.fn(DataConfig()).path)
    train = prepare_splits(splits, tokenizer, TrainingConfig())[0]
    examples = [{"input_ids": train[i]["input_ids"]} for i in range(rows)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"padded": DataCollatorForLanguageModeling(pad_token_id=pad)(examples),
            "packed": DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(examples)}


def time_row(row: str, model, opt, batch: dict, device: str, bf16: bool, warm: int, steps: int,
             profiled: int = 2) -> dict:
    """Median ms of one optimizer step of `row` after `warm` steps, then `profiled` steps under the profiler."""
    import torch
    from gpu_run import counts
    from torch.profiler import ProfilerActivity, profile

    _, attention, head, metrics, cudnn = ROWS[row]
    model.config._attn_implementation = attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                            SDPBackend.CUDNN_ATTENTION) if cudnn or b != SDPBackend.CUDNN_ATTENTION]
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}

    def one() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(backends):
            if head:
                out = model(**inputs, fused_lm_head=True)
                n = out.label_mask.sum()
                loss = -out.log_probs.sum() / n.clamp(min=1)
                if metrics:  # as TRL's compute_loss: entropy, token accuracy, tokens seen
                    if n > 0:
                        (out.entropy.detach().sum() / n).item()
                        (out.is_top1.sum() / n).item()
                    torch.tensor(inputs["input_ids"].size(1), device=device).sum().item()
            else:
                loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warm):
        one()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        one()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=kinds) as prof:
        for _ in range(profiled):
            one()
        sync()
    tokens = int(inputs["input_ids"].numel())
    return {"row": row, "ms": statistics.median(times), "tokens": tokens} | counts(prof, profiled)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto", help="'auto': the built-in SmolLM2-135M-Instruct offline")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--steps", type=int, default=15, help="timed steps per row, after --warm")
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--trainer-steps", type=int, default=40, help="gpu_run.py's Trainer steps per configuration (0: skip)")
    p.add_argument("--profile-steps", type=int, default=2, help="steps under torch's profiler, per row and per Trainer")
    p.add_argument("--out", default="gpu_step.json")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: every core, as a run)")
    args = p.parse_args()
    if args.profile_steps < 1:
        p.error(f"--profile-steps {args.profile_steps}: at least 1")
    least = 4 * args.profile_steps  # as gpu_run.py: it times the steps between its warm-up half and the profiled ones
    if args.trainer_steps and args.trainer_steps < least:
        p.error(f"--trainer-steps {args.trainer_steps}: 0 (skip the Trainers) or at least {least}, so steps remain to time")
    from tasks.runtime import set_torch_threads

    set_torch_threads(args.threads or None)  # as gpu_run.py: a run's threads, or --threads
    import torch
    from gpu_run import require_device, train
    from trl.trainer.utils import add_fused_lm_head

    import tasks.packed_attention  # noqa: F401 (registers smolflow-packed with transformers)
    from tasks.config import ExecutionConfig
    from tasks.device import publish
    from tasks.memory import freed_memory_kept
    from tasks.models import load_model, resolve_model

    gpu = require_device(args.device)
    placement = publish(ExecutionConfig(device="auto" if args.device == "cuda" else "cpu"))
    bf16 = placement.precision == "bf16"
    print(f"device: {gpu}; precision {placement.precision}", flush=True)
    model, tokenizer = load_model(resolve_model.fn(args.model), as_stored=True)
    model.to(args.device).train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")
    found = batches(tokenizer)
    rows = []
    # On a CPU, as a CPU run trains: glibc keeps freed blocks (tasks/memory.py); without it, every
    # step's page faults were half the system time of a row. A GPU's steps are the same either way.
    with freed_memory_kept(args.device == "cpu"):
        for row in ROWS:
            rows.append(time_row(row, model, opt, found[ROWS[row][0]], args.device, bf16, args.warm, args.steps,
                                 args.profile_steps))
            print(json.dumps(rows[-1]), flush=True)
    del model, opt
    trainers = []
    if args.trainer_steps:
        out_dir = Path(args.out).with_suffix("")
        for config in ("smolflow", "seed"):
            ns = SimpleNamespace(model=args.model, steps=args.trainer_steps, profile_steps=args.profile_steps)
            t = train(ns, placement, out_dir, config=config)
            trainers.append({"row": f"Trainer ({config})", "ms": t["step_ms"], "tokens": round(t["tokens"] / t["steps"]),
                             "tokens_per_s": t["tokens_per_s"], "levers": t["levers"]} | t["profile"])
            print(json.dumps(trainers[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"device": gpu, "precision": placement.precision, "rows": rows,
                                          "trainers": trainers}, indent=2), encoding="utf-8")
    print(f"\n{gpu}, {placement.precision}: a training step of SmolLM2-135M on 4 fixture conversations\n"
          "| step | tokens | ms/step | launches/step | syncs/step | cudaMalloc+Free/step | device busy ms/step |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows + trainers:  # a Trainer's tokens: its mean a step over the fixture's batches
        print(f"| {r['row']} | {r['tokens']} | {r['ms']:.1f} | {r['launches']:.0f} | {r['syncs']:.0f} | "
              f"{r['mallocs']:.0f} | {r['device_ms']:.1f} |")


if __name__ == "__main__":
    main()
