"""Training throughput: the seed tutorial's SFT settings vs smolflow's, lever by lever, side by side.

    python scripts/bench_training.py                  # real SmolLM2-135M, fixture data, seed vs smolflow
    python scripts/bench_training.py --configs seed,fp32,bf16 --steps 3 --rounds 2

Configurations: `seed` (TRL defaults: gradient checkpointing, padded batches, fp32); `fp32`
(smolflow's knobs in fp32: checkpointing off, padding-free); `compile` (fp32 plus torch.compile);
`bf16` (fp32 plus bf16 autocast: only worth it on CPUs with bf16 units); `smolflow` (smolflow's
defaults as a run gets them: precision `auto`, decided by the probe in tasks/device.py);
`seed-kept` (the seed plus only the freed-memory lever, which any script could use);
`fp32-plain` and `bf16-plain` (the same without tasks/train_levers.py's CPU levers: transformers'
SDPA over the packed row with its block-diagonal mask, TRL's LM-head chunk, glibc's malloc defaults).
Two levers measured and not kept: `fp32-bf16mm` (fp32, but oneDNN rounds every fp32 matmul's inputs
to bf16 and accumulates in fp32: where bf16's loss gap comes from) and `bf16-regional` (bf16 with
each decoder layer's norms and MLP under torch.compile, dynamic shapes: one compile for every length).
`fp32-every`: fp32 with TRL's CPU LM head scoring every position, labelled or not (TRL's own
choice off Triton; smolflow scores the labelled ones only: it pays with `--assistant-only`).
`fp32-ddp2` and `bf16-ddp2`: `training.num_processes: 2` as a run does it (torchrun, gloo, the
cores split between the ranks), each rank half the seed's batch, so the global batch and the
optimizer's steps stay the seed's; tokens/s counts both ranks.

Each configuration runs in its own fresh process (so peak memory is its own), and the two are
interleaved round by round, so load from other users of the machine hits both alike. Printed per
configuration: real (non-padding) tokens/s, the ratio to the seed, minor page faults per step,
peak RSS, mean loss on the timed steps (after `--warmup` untimed ones: a nightly's hundreds of
steps run in the steady state, not in the first steps' allocations), and MFU against an fp32 matmul peak measured in the same process with its threads.
The training loss is each configuration's own measure (under bf16 autocast, in bf16), so the loss
compared across configurations is the held-out one: the trained weights on the fixture's test
conversations, in fp32 for all.
`--assistant-only`: every configuration trains on the assistant's tokens only (the chat template
with generation markers, tasks/chat_templates/chatml-assistant-only.jinja; the seed through TRL's
`assistant_only_loss`), as a run does with `template.assistant_only_loss: true` (and its `auto` on
prompt/completion or ShareGPT rows); tokens/s still counts every real token.
Not a test: numbers go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = ("seed", "seed-kept", "fp32", "compile", "bf16", "smolflow", "fp32-plain", "bf16-plain",
           "fp32-bf16mm", "bf16-regional", "fp32-ddp2", "bf16-ddp2", "fp32-every")
DEFAULT_CONFIGS = "seed,fp32,compile,smolflow"


def matmul_peak_flops(n: int = 1024, reps: int = 8) -> float:
    """Best fp32 matmul FLOP/s of this process with its torch threads: the MFU denominator."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def ranks(name: str) -> int:
    """How many data-parallel processes a configuration trains on."""
    return 2 if name.endswith("-ddp2") else 1


def assistant_only() -> bool:
    return os.environ.get("BENCH_ASSISTANT_ONLY") == "1"


def trainer_args(name: str, out: str, steps: int, seed: int = 42):
    """The seed's SFTConfig (TRL defaults, batch 4, fp32) or smolflow's sft_config defaults."""
    from trl import SFTConfig

    from tasks.config import TrainingConfig
    from tasks.training import sft_config

    if name.startswith("seed"):  # TRL defaults: gradient checkpointing on, padded batches; the seed trains in fp32 here
        return SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, bf16=False,
                         use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                         logging_steps=1, learning_rate=5e-5, warmup_steps=0.1, seed=seed,
                         assistant_only_loss=assistant_only())
    from tasks.config import ExecutionConfig
    from tasks.device import resolve

    cfg = TrainingConfig(max_steps=steps, logging_steps=1, save_steps=10_000, eval_steps=10_000, seed=seed,
                         per_device_train_batch_size=4 // ranks(name))  # the global batch stays the seed's 4
    precision = {"fp32": "fp32", "compile": "fp32", "bf16": "bf16", "smolflow": "auto"}[name.split("-")[0]]
    placement = resolve(ExecutionConfig(device="cpu", precision=precision))
    # Constructor arguments: SFTConfig attributes set afterwards were not all honoured.
    return sft_config(cfg, out, [], placement, torch_compile=name == "compile",
                      eval_strategy="no", save_strategy="no")


def counting(trainer_class):
    """`trainer_class` counting the real tokens it trains on in `tokens` (gpu_run.py's too)."""

    class Counting(trainer_class):
        tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")  # padded batches; padding-free ones hold real tokens only
            self.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    return Counting


def held_out_loss(model, model_dir: str) -> float:
    """Mean token loss of the trained weights on the fixture's held-out conversations, measured the
    same way for every configuration: fp32, no autocast, transformers' SDPA, one conversation per pass."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.runtime import FIXTURES
    from tasks.tokenization import tokenize_split

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test = load_dataset("json", data_files=str(FIXTURES / "everyday_conversations" / "test.jsonl"), split="train")
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"  # full fp32 matmuls whatever the configuration set
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    fresh.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    fresh.eval()
    total = count = 0
    with torch.no_grad():
        for ids in tokenize_split(test, tokenizer, 512, split="test")["input_ids"]:
            row = torch.tensor([ids])
            total += float(fresh(input_ids=row, labels=row).loss) * (len(ids) - 1)
            count += len(ids) - 1
    return total / count


def worker(name: str, model_dir: str, steps: int, warmup: int, seed: int = 42) -> dict:
    """Train `warmup + steps` steps with one configuration; time and count the last `steps`."""
    import resource

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from tasks import lm_head_cpu, train_levers
    from tasks.config import TrainingConfig
    from tasks.runtime import FIXTURES, set_torch_threads
    from tasks.training import prepare_splits

    # The seed leaves torch's default (all cores); smolflow sets its own (tasks.runtime), or --threads.
    if not name.startswith("seed"):
        threads = set_torch_threads(int(os.environ.get("BENCH_THREADS", 0)) or None)
    else:
        torch.set_num_threads(int(os.environ.get("BENCH_SEED_THREADS", 0)) or torch.get_num_threads())
        threads = torch.get_num_threads()
    peak = matmul_peak_flops()
    data = load_dataset("json", data_files=str(FIXTURES / "everyday_conversations" / "train.jsonl"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if assistant_only():  # the same rendering with the assistant's tokens marked, for every configuration
        from tasks.templates import TEMPLATE_DIR

        tokenizer.chat_template = (TEMPLATE_DIR / "chatml-assistant-only.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="bench-training-")  # the Trainer's output_dir (nothing saved); removed at exit
    atexit.register(shutil.rmtree, out, True)
    args = trainer_args(name, out, warmup + steps, seed)
    # As tasks.training.fit does; the seed and the -plain rows keep transformers' and TRL's defaults.
    levers = train_levers.apply(model, args.padding_free, "cpu", args.bf16,
                                enabled=not name.startswith("seed") and not name.endswith("-plain"))
    if name == "fp32-every":  # TRL's choice on a CPU: every position through the LM head
        levers["lm_head_scores"] = "every" if not lm_head_cpu.score_labelled_only(False) else "labelled"
    if name == "seed-kept":  # the seed with only the allocator lever: what that lever alone is worth
        levers["freed_memory_kept"] = train_levers.glibc() is not None
    if name == "fp32-bf16mm":  # fp32 tensors; oneDNN's matmuls round inputs to bf16 (held_out_loss resets it)
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    if name == "bf16-regional":  # the 30 layers share one compiled graph per module kind
        for layer in model.model.layers:
            for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
                module.compile(dynamic=True)
    train = data if name.startswith("seed") else prepare_splits({"train": data, "test": data}, tokenizer, TrainingConfig(),
                                                                assistant_only_loss=assistant_only())[0]

    marks: list[tuple[float, int, int]] = []  # after each step: clock, tokens so far, minor page faults so far

    Counting = counting(SFTTrainer)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), trainer.tokens, resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    trim = train_levers.trim_callback(levers["freed_memory_kept"])
    trainer = Counting(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                       callbacks=[Clock()] + ([trim] if trim else []))
    start = time.perf_counter()
    with train_levers.freed_memory_kept(levers["freed_memory_kept"]):
        trainer.train()
    t0, n0, f0 = marks[warmup - 1] if warmup else (start, 0, 0)
    t1, n1, f1 = marks[-1]
    world, tokens = ranks(name), n1 - n0
    if world > 1:  # every rank's tokens; each step ends together (the gradients' all-reduce)
        import torch.distributed as dist

        counted = torch.tensor([tokens])
        dist.all_reduce(counted)
        tokens = int(counted)
        if dist.get_rank() != 0:
            return {}
        peak *= world  # each rank measured its own cores' peak, at the same time as the other
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once: the LM head matmul
    tokens_per_s = tokens / (t1 - t0)
    return {
        "config": name,
        "threads": f"{world}x{threads}" if world > 1 else threads,
        "steps": steps,
        "s_per_step": (t1 - t0) / steps,
        "tokens": tokens,
        "tokens_per_s": tokens_per_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss_timed_steps": sum(losses[warmup:]) / max(1, len(losses[warmup:])),
        "losses": losses,
        "held_out_loss": held_out_loss(model, model_dir),
        "matmul_peak_gflops": peak / 1e9,
        "mfu": 6 * params * tokens_per_s / peak,  # model FLOPs (6N per token), not recompute
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "padding_free": bool(args.padding_free),
        "bf16": bool(args.bf16),
        "torch_compile": "regional" if name == "bf16-regional" else bool(args.torch_compile),
        "attention": levers["attention"] + (" (fp32)" if levers.get("attention_fp32_under_bf16") else ""),
        "lm_head_chunk": levers["lm_head_vocab_chunk"],
        "lm_head": levers["lm_head"],
        "lm_head_scores": levers.get("lm_head_scores", "every"),
        "freed_memory_kept": levers["freed_memory_kept"],
        "minor_faults_per_step": (f1 - f0) / max(1, steps),
    }


def _held_out(rs: list[dict]) -> str:
    """Mean held-out loss; over several seeds, each seed's value too (their spread is the yardstick)."""
    by_seed: dict[int, list[float]] = {}
    for x in rs:
        by_seed.setdefault(x["seed"], []).append(x["held_out_loss"])
    mean = sum(x["held_out_loss"] for x in rs) / len(rs)
    if len(by_seed) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} (" + ", ".join(f"{s}: {sum(v) / len(v):.4f}" for s, v in sorted(by_seed.items())) + ")"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the built-in SmolLM2-135M)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (steady state: the first steps allocate the optimizer state and page in fresh memory)")
    p.add_argument("--rounds", type=int, default=2, help="seed, smolflow, seed, smolflow, ...")
    p.add_argument("--threads", type=int, default=0, help="smolflow's torch threads (default: its own setting)")
    p.add_argument("--seed-threads", type=int, default=0, help="the seed's torch threads (default: torch's)")
    p.add_argument("--seeds", default="42", help="comma-separated training seeds (batch order), each run per round: "
                   "the spread of the held-out loss over seeds is what a precision's loss is compared with")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--assistant-only", action="store_true", help="train on the assistant's tokens only, every configuration")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    a = p.parse_args()
    configs = [c for c in a.configs.split(",") if c]
    if "seed" not in configs or set(configs) - set(CONFIGS):
        p.error(f"--configs: need 'seed' (the baseline) and names from {', '.join(CONFIGS)}")
    if a.worker:
        result = worker(a.worker, a.model, a.steps, a.warmup, int(a.seeds))
        if result:  # a DDP rank other than 0 has nothing to report
            print("RESULT " + json.dumps(result))
        return
    if a.model is None:
        from tasks.models import convert_builtin

        a.model = str(convert_builtin())
    if a.threads:
        os.environ["BENCH_THREADS"] = str(a.threads)
    if a.assistant_only:
        os.environ["BENCH_ASSISTANT_ONLY"] = "1"
    if a.seed_threads:
        os.environ["BENCH_SEED_THREADS"] = str(a.seed_threads)
    load = os.getloadavg()
    results: dict[str, list[dict]] = {c: [] for c in configs}
    seeds = [int(x) for x in a.seeds.split(",") if x]
    for r, seed in ((r, seed) for r in range(a.rounds) for seed in seeds):
        for name in configs:
            cmd = [sys.executable, __file__, "--worker", name, "--model", a.model,
                   "--steps", str(a.steps), "--warmup", str(a.warmup), "--seeds", str(seed)]
            env = os.environ
            if ranks(name) > 1:  # as tasks.training.launch starts the ranks: each its share of the cores
                logs = tempfile.mkdtemp(prefix="bench-torchrun-")  # else torchrun keeps a /tmp/torchelastic_* a launch
                atexit.register(shutil.rmtree, logs, True)
                cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks(name)}",
                            f"--log-dir={logs}"]
                share = str(max(1, (a.threads or os.cpu_count() or 1) // ranks(name)))
                env = os.environ | {"OMP_NUM_THREADS": share, "BENCH_THREADS": share}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[-1][7:])
            res["seed"] = seed
            results[name].append(res)
            print(f"round {r + 1} seed {seed} {name}: {res['tokens_per_s']:.1f} tok/s, {res['s_per_step']:.2f} s/step, "
                  f"losses {[round(x, 3) for x in res['losses']]}, held-out {res['held_out_loss']:.4f}", flush=True)

    def total(name, key):
        return sum(x[key] for x in results[name])

    print(f"\nload average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; at end "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f"; {os.cpu_count()} CPUs")
    print(f"loss on: {'the assistant tokens only' if a.assistant_only else 'every token'}")
    print("| config | threads | grad ckpt | padding-free | attention | LM head (chunk, positions scored) | freed memory kept | bf16 | compile "
          "| tokens/s | ratio | s/step | page faults/step | peak RSS MB | MFU | matmul peak GFLOP/s | mean loss (timed steps) "
          "| held-out loss (fp32) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    seed_tps = total("seed", "tokens") / sum(x["s_per_step"] * x["steps"] for x in results["seed"])
    for name in configs:
        rs = results[name]
        tps = total(name, "tokens") / sum(x["s_per_step"] * x["steps"] for x in rs)
        mfu = sum(x["mfu"] for x in rs) / len(rs)
        print(f"| {name} | {rs[0]['threads']} | {rs[0]['gradient_checkpointing']} | {rs[0]['padding_free']} | "
              f"{rs[0]['attention']} | {rs[0]['lm_head']} ({rs[0]['lm_head_chunk']}, {rs[0]['lm_head_scores']}) | {rs[0]['freed_memory_kept']} | {rs[0]['bf16']} | "
              f"{rs[0]['torch_compile']} | {tps:.1f} | {tps / seed_tps:.2f}x | {total(name, 's_per_step') / len(rs):.2f} | "
              f"{total(name, 'minor_faults_per_step') / len(rs):,.0f} | {max(x['peak_rss_mb'] for x in rs):.0f} | {mfu:.1%} | "
              f"{sum(x['matmul_peak_gflops'] for x in rs) / len(rs):.1f} | "
              f"{sum(x['loss_timed_steps'] for x in rs) / len(rs):.4f} | "
              f"{_held_out(rs)} |")


if __name__ == "__main__":
    main()
