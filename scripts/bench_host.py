"""The host's share of a training step, on a CPU: is smolflow's Trainer step heavier than a bare loop?

    python scripts/bench_host.py           # both tables, each configuration in its own process

On the first GPU lent (docs/performance.md#gpu) the GPU waited on the host, and a Trainer step took
4x a bare PyTorch step (the cause, found on the GPU by scripts/gpu_step.py: cuDNN's host time per
per-sequence attention call). Two measurements here say whether that comes from the Trainer's side:
- `ops`: top-level aten calls per step (torch's profiler; what the host dispatches, on a GPU about
  one kernel launch each) of the real SmolLM2-135M on the fixture, fp32: a bare loop over a batch of
  4 x 135 tokens, smolflow's Trainer with the levers it sets on a GPU, and the seed's Trainer;
- `time`: milliseconds per step with the compute taken away (SmolLM2's 30 layers, 16 wide, a
  256-token vocabulary, the fixture's packed rows, 1 thread), so what is left is the host's work.
Not a test; numbers go to docs/performance.md.
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

RUNS = [("ops", "bare"), ("ops", "smolflow"), ("ops", "seed"), ("time", "bare"), ("time", "smolflow")]
STEPS = {"ops": 14, "time": 60}  # ops: steps 10-12 profiled; time: the median after 10


def top_level_aten(prof) -> int:
    """aten calls not made from inside another aten call: what Python dispatched."""
    def inside(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not inside(e))


def worker(what: str, config: str) -> dict:
    import torch
    from datasets import load_from_disk
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tasks import train_levers
    from tasks.config import DataConfig, ExecutionConfig, TrainingConfig
    from tasks.data import load_chat_dataset
    from tasks.device import resolve
    from tasks.models import convert_builtin, load_model, resolve_model
    from tasks.training import prepare_splits, sft_config

    torch.set_num_threads(1 if what == "time" else 2)
    tokenizer = AutoTokenizer.from_pretrained(str(convert_builtin()))
    torch.manual_seed(0)
    if what == "ops":
        model = load_model(resolve_model.fn("auto"), as_stored=True)[0]
        vocab = model.config.vocab_size
    else:
        vocab = 256
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                             pad_token_id=0, eos_token_id=1, bos_token_id=1))
    steps, marks, counts = STEPS[what], [], []
    splits = load_from_disk(load_chat_dataset.fn(DataConfig()).path)
    cfg = TrainingConfig(max_steps=steps, logging_steps=25, eval_steps=10**6, save_steps=10**9)

    def measured(step: int, run) -> None:
        if what == "ops" and step in (10, 11, 12):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            counts.append(top_level_aten(prof))
        else:
            start = time.perf_counter()
            run()
            marks.append(time.perf_counter() - start)

    if config == "bare":  # the probe's loop (scripts/gpu_probe.py), with the Trainer's clipping
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
        ids = torch.randint(0, vocab, (1, 540))
        positions = torch.arange(135).repeat(4)[None]  # 4 packed conversations, as padding-free rows come

        def one():
            model(input_ids=ids, labels=ids, position_ids=positions).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for step in range(steps):
            measured(step, one)
    else:
        out = tempfile.mkdtemp(prefix="bench-host-")  # the Trainer's output_dir (nothing saved); removed at exit
        atexit.register(shutil.rmtree, out, True)
        if config == "seed":
            args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-5,
                             save_strategy="no", report_to=[], bf16=False, use_cpu=True, disable_tqdm=True)
            train = splits["train"]
        else:
            placement = resolve(ExecutionConfig(device="cpu", precision="fp32"))
            args = sft_config(cfg, out, [], placement, save_strategy="no", eval_strategy="no")  # fused AdamW, as on a GPU
            train = prepare_splits(splits, tokenizer, cfg)[0]
            if what == "time":
                train = train.map(lambda r: {"input_ids": [i % vocab for i in r["input_ids"]]})
        # the levers a GPU run sets (the CPU-only ones would change the op count); the seed: none
        train_levers.apply(model, args.padding_free, "cuda", False, enabled=config != "seed")

        class Measure(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                if what == "ops" and state.global_step in (10, 11, 12):
                    self.prof = profile(activities=[ProfilerActivity.CPU])
                    self.prof.__enter__()
                self.started = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                if what == "ops" and state.global_step - 1 in (10, 11, 12):
                    self.prof.__exit__(None, None, None)
                    counts.append(top_level_aten(self.prof))
                else:
                    marks.append(time.perf_counter() - self.started)

        SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                   callbacks=[Measure()]).train()
    steady = sorted(marks[10:])
    return {"what": what, "config": config, "ops_per_step": sum(counts) / len(counts) if counts else None,
            "median_ms": 1e3 * steady[len(steady) // 2] if what == "time" else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(*a.worker)))
        return
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = []
    for what, config in RUNS:
        done = subprocess.run([sys.executable, __file__, "--worker", what, config], capture_output=True, text=True, env=env)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            sys.exit(f"{what} {config} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(line[-1][7:]))
        print(rows[-1], flush=True)
    print("\n| configuration | top-level aten calls per step (SmolLM2-135M, fp32) | ms per step, compute taken away |")
    print("|---|---|---|")
    for config in ("bare", "smolflow", "seed"):
        ops = next((r["ops_per_step"] for r in rows if r["config"] == config and r["what"] == "ops"), None)
        ms = next((r["median_ms"] for r in rows if r["config"] == config and r["what"] == "time"), None)
        print(f"| {config} | {ops:,.0f} | " + (f"{ms:.1f} |" if ms is not None else "|"))


if __name__ == "__main__":
    main()
