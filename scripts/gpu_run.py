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
and seconds per benchmark, each with its data source; writes everything to --out as JSON. Without
CUDA it stops at once; `--device cpu` runs the same code on a CPU, to check the script where no GPU
is (tests/test_gpu_run.py does, on a tiny model), not for numbers.

Offline (`HF_HUB_OFFLINE=1`, as `make run` sets it, and as a machine that reaches no hub must run it),
the model is the built-in SmolLM2-135M-Instruct and the data the shipped fixtures, which the table
marks `fixture`: timings then hold, scores do not stand next to published ones.
Training is timed per optimizer step, evaluation between steps left out, after the first
min(10, half) steps; it trains as tasks/training.py's `fit` does (sft_config and the levers of
tasks/train_levers.py that pay on the device, recorded under `levers`). Then, side by side in the
same process (`--no-seed` skips it), the seed tutorial's own SFTConfig for the same steps on the same
data, and a table of both: tokens/s, the ratio, and each one's held-out loss measured alike.
`--profile-steps N` profiles each training's last N steps (left out of tokens/s) and prints host
vs device milliseconds per step and the heaviest host ops: on the first GPU lent (docs/performance.md#gpu)
a step took 4x a bare PyTorch step of the same model, with the GPU idle most of the time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROFILE = ("mmlu", "bbh", "gsm8k", "math", "humaneval")


def require_device(device: str) -> str:
    """The device's name; without CUDA (and --device cuda) stop at once, before anything loads."""
    import torch

    if device == "cpu":
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    if not torch.cuda.is_available():
        sys.exit(f"gpu_run.py needs a CUDA GPU, and torch {torch.__version__} sees none "
                 f"(CUDA build: {torch.version.cuda or 'no, a CPU-only torch'}). Run it on a GPU machine "
                 "with a CUDA build of torch; on CPUs use scripts/bench_training.py for numbers, "
                 "and --device cpu to check this script.")
    return torch.cuda.get_device_name(0)


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so the clock reads finished work (a CPU has none queued)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_flops(device: str, dtype_name: str, reps: int = 10) -> float:
    """Best matmul FLOP/s on this device in the training dtype: the MFU denominator."""
    import torch

    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")
MALLOC = ("cudaMalloc", "cudaFree")


def counts(prof, steps: int) -> dict:
    """Per step, from torch's profiler: kernel launches, host-device syncs (and copies), cudaMalloc/cudaFree
    calls (the caching allocator missing), host ms of ops and busy device ms."""
    events = prof.key_averages()

    def calls(names) -> float:
        return sum(e.count for e in events if e.key in names) / steps

    from torch.autograd import DeviceType

    # Device time of the device's own events (kernels, copies), as torch's table sums it: an op's row
    # also carries the time of the kernels it launched, and summing both counts them twice.
    on_device = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    return {"launches": calls(LAUNCH), "syncs": calls(SYNC), "mallocs": calls(MALLOC),
            "host_ms": sum(e.self_cpu_time_total for e in events) / steps / 1e3,
            "device_ms": sum(e.self_device_time_total for e in on_device) / steps / 1e3}


def profile_table(prof, steps: int, config: str) -> str:
    """Where a step's time goes, per step: host (CPU) and device time in all, then the heaviest host ops."""
    c = counts(prof, steps)
    return (f"\nprofile of {config}'s last {steps} steps, per step: host {c['host_ms']:.1f} ms of ops, device "
            f"{c['device_ms']:.1f} ms, {c['launches']:.0f} kernel launches, {c['syncs']:.0f} syncs or copies, "
            f"{c['mallocs']:.0f} cudaMalloc/cudaFree (host far above device: the GPU waits on Python and launches)\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def train(args, placement, out_dir: Path, config: str = "smolflow") -> dict:
    """`steps` SFT steps, timed per token: smolflow's settings (as tasks/training.py's `fit` trains), or
    `seed`, the seed tutorial's SFTConfig (batch 4, lr 5e-5, TRL's defaults: gradient checkpointing,
    padded batches, bf16 autocast where the device has it) on the raw conversations, as it trains."""
    from bench_training import counting, held_out_loss  # scripts/ is on sys.path: this script's folder
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tasks import train_levers
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
    steps: list[tuple[float, int]] = []  # per optimizer step: seconds, tokens (evaluation in between not counted)

    Counting = counting(SFTTrainer)

    class Clock(TrainerCallback):
        started = 0.0
        tokens = 0

        def on_step_begin(self, a, state, control, **kw):
            sync(placement.device)
            self.started, self.tokens = time.perf_counter(), trainer.tokens

        def on_step_end(self, a, state, control, **kw):
            sync(placement.device)
            steps.append((time.perf_counter() - self.started, trainer.tokens - self.tokens))

    class Profile(TrainerCallback):  # the last `--profile-steps` steps under torch's profiler (not timed)
        prof = None
        counts: dict = {}
        evaluations = 0  # inside the profiled window: none, or the profile is not the steps'

        def on_evaluate(self, a, state, control, **kw):
            self.evaluations += self.prof is not None

        def on_step_begin(self, a, state, control, **kw):
            if args.profile_steps and state.global_step == a.max_steps - args.profile_steps:
                from torch.profiler import ProfilerActivity, profile

                kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if placement.device == "cuda" else [])
                self.prof = profile(activities=kinds)
                self.prof.__enter__()

        def on_step_end(self, a, state, control, **kw):  # the last step's end: before the evaluation after it
            if self.prof is not None and state.global_step == a.max_steps:
                sync(placement.device)
                self.prof.__exit__(None, None, None)
                self.counts = counts(self.prof, args.profile_steps) | {"evaluations_profiled": self.evaluations}
                print(profile_table(self.prof, args.profile_steps, config), flush=True)
                self.prof = None

    if config == "seed":  # the seed's cell (it sets eval_steps but no eval_strategy: no evaluation), plus
        # smolflow's 10% warm-up, as scripts/bench_training.py's seed row: the schedule is no speed lever,
        # and the held-out losses then compare the levers alone
        sft_args = SFTConfig(output_dir=str(out_dir / "checkpoints"), max_steps=args.steps, per_device_train_batch_size=4,
                             learning_rate=5e-5, warmup_steps=0.1, logging_steps=10, save_strategy="no", report_to=[],
                             bf16=placement.precision == "bf16", use_cpu=placement.device == "cpu", disable_tqdm=True)
        train_ds, test_ds = splits["train"], None
    else:
        sft_args = sft_config(cfg, str(out_dir / "checkpoints"), [], placement, save_strategy="no")
        train_ds, test_ds = prepare_splits(splits, tokenizer, cfg)
    # As tasks.training.fit trains: the levers that pay on this device (CPU ones only on a CPU); the seed: none.
    levers = train_levers.apply(model, sft_args.padding_free, placement.device, sft_args.bf16, enabled=config != "seed")
    trim = train_levers.trim_callback(levers["freed_memory_kept"])
    profiled = Profile()
    trainer = Counting(model=model, args=sft_args, train_dataset=train_ds, eval_dataset=test_ds,
                       processing_class=tokenizer, callbacks=[Clock(), profiled] + ([trim] if trim else []))
    with train_levers.freed_memory_kept(levers["freed_memory_kept"]):
        output = trainer.train()
    # the first steps include start-up and kernel selection; the profiled ones the profiler's own cost
    timed = steps[min(10, len(steps) // 2):len(steps) - args.profile_steps]
    tokens_per_s = sum(n for _, n in timed) / sum(t for t, _ in timed)
    params = sum(p.numel() for p in model.parameters())
    peak = peak_flops(placement.device, placement.precision)
    model_dir = out_dir / ("model" if config == "smolflow" else f"model-{config}")
    trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return {"config": config, "model": args.model, "steps": trainer.state.global_step,
            "train_loss": output.training_loss,
            "eval_loss": trainer.evaluate()["eval_loss"] if test_ds is not None else None,
            # both configurations' weights on the fixture's held-out conversations, measured alike (fp32, CPU)
            "held_out_loss": held_out_loss(trainer.model, str(model_dir)),
            "tokens_per_s": tokens_per_s, "tokens": trainer.tokens,
            "step_ms": 1e3 * statistics.median(t for t, _ in timed), "profile": profiled.counts,
            "mfu": 6 * params * tokens_per_s / peak, "matmul_peak_tflops": peak / 1e12,
            "train_runtime_s": output.metrics["train_runtime"], "precision": placement.precision,
            "bf16_autocast": bool(sft_args.bf16), "gradient_checkpointing": bool(sft_args.gradient_checkpointing),
            "padding_free": bool(sft_args.padding_free), "timed_steps": len(timed), "levers": levers}


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
        # Offline (no hub) the items are the shipped fixtures: the data source goes with every row.
        rows.append({"benchmark": name, "metric": result.metric, "n": result.n, "score": result.score,
                     "seconds": seconds, "s_per_item": seconds / max(1, result.n), "backend": args.backend,
                     "data": result.provenance.get("source", "?")})
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
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: check this script end to end where no GPU is (its numbers are a CPU's, not for docs/)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: every core, as a run)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile each training's last N steps (left out of tokens/s): host vs device time, heaviest ops")
    p.add_argument("--no-seed", dest="seed", action="store_false",
                   help="skip the baseline: the seed tutorial's SFTConfig, the same steps on the same data after smolflow's")
    args = p.parse_args()
    if not 0 <= args.profile_steps <= args.steps // 4:
        p.error(f"--profile-steps {args.profile_steps}: at most a quarter of --steps ({args.steps // 4}), "
                "so steps remain to time")
    from tasks.runtime import set_torch_threads

    set_torch_threads(args.threads or None)
    gpu = require_device(args.device)

    from tasks.config import ExecutionConfig
    from tasks.device import publish

    # On a GPU the decision a run makes (execution.device and precision auto), checked: it must pick the GPU.
    placement = publish(ExecutionConfig(device="auto" if args.device == "cuda" else "cpu"))
    print(f"device: {gpu}; execution.device auto -> {placement.device}, precision auto -> {placement.precision} "
          f"({placement.reason})", flush=True)
    if placement.device != args.device:
        sys.exit(f"gpu_run.py: execution.device auto chose {placement.device} on a machine with {gpu}")
    out_dir = Path(args.out).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        training = train(args, placement, out_dir)
    except ConnectionError as e:  # the hub unreachable: one line and the fix, not a chained traceback
        sys.exit(f"gpu_run.py: {e}\n(offline, set HF_HUB_OFFLINE=1: --model auto is then the built-in SmolLM2)")
    print(json.dumps(training), flush=True)
    seed = None
    if args.seed:  # side by side in this process, on the same device, after smolflow's (kernels warm for both)
        seed = train(args, placement, out_dir, config="seed")
        print(json.dumps(seed), flush=True)
    found = {"device": gpu, "training": training, "seed_training": seed, "benchmarks": []}
    Path(args.out).write_text(json.dumps(found, indent=2), encoding="utf-8")  # kept, should a benchmark then fail
    benchmarks = found["benchmarks"] = score(args, placement, out_dir / "model")
    Path(args.out).write_text(json.dumps(found, indent=2), encoding="utf-8")
    print(f"\n{gpu}: {training['tokens_per_s']:.0f} training tokens/s, MFU {training['mfu']:.1%} "
          f"({training['precision']}, {training['steps']} steps, eval loss {training['eval_loss']:.4f})")
    print("| training | bf16 autocast | grad ckpt | padding-free | attention | tokens/s | ratio | MFU | "
          "held-out loss (fp32) |\n|---|---|---|---|---|---|---|---|---|")
    for t in [x for x in (seed, training) if x]:
        ratio = t["tokens_per_s"] / (seed or training)["tokens_per_s"]
        print(f"| {t['config']} | {t['bf16_autocast']} | {t['gradient_checkpointing']} | {t['padding_free']} | "
              f"{t['levers']['attention']} | {t['tokens_per_s']:.0f} | {ratio:.2f}x | {t['mfu']:.1%} | "
              f"{t['held_out_loss']:.4f} |")
    print("| benchmark | data | n | score | seconds | s/item |\n|---|---|---|---|---|---|")
    for r in benchmarks:
        print(f"| {r['benchmark']} | {r['data']} | {r['n']} | {r['score']:.3f} | {r['seconds']:.0f} | "
              f"{r['s_per_item']:.3f} |")


if __name__ == "__main__":
    main()
