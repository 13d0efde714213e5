"""Why a GPU trains slowly: kernel launch cost, and one SmolLM2-135M-shaped training step without TRL.

    python3 scripts/gpu_probe.py      # on the device machine, with its image's torch and transformers alone

Needs no kit and no weights (the model is built from SmolLM2-135M's shape, randomly initialised), so it
runs in one call of the `device` tool. Prints: microseconds per launch of a tiny kernel; one training
step (fwd + bwd + fused AdamW, bf16 autocast over fp32 weights, as gpu_run.py trains) at the fixture's
batch (4 conversations of ~135 tokens) with torch's default and 1 CPU thread; the same step captured as
one CUDA graph (what removing the host's share would give); and a torch profile of the eager step.
"""

from __future__ import annotations

import time

import torch


def per_launch_us(n: int = 5000) -> float:
    x = torch.zeros(16, device="cuda")
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).cuda()


def step_ms(m, opt, batch, steps: int = 20) -> float:
    def one():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        one()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def graphed_step_ms(m, batch, steps: int = 20) -> str:
    """The same step captured once as a CUDA graph and replayed: one launch for all its kernels, so
    what is left is the GPU's own time (what CUDA graphs, e.g. torch.compile's reduce-overhead,
    could give at a fixed shape). Padded or bucketed rows would be needed in training, where
    padding-free rows change shape every step."""
    try:
        opt = torch.optim.AdamW(m.parameters(), lr=5e-5, fused=True, capturable=True)

        def one():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # no cast cache in a graph
                loss = m(**batch).loss
            loss.backward()
            opt.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture needs
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                one()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            one()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / steps * 1e3
        return f"train step, one CUDA graph replayed: {ms:.1f} ms ({batch['input_ids'].numel() / ms * 1e3:.0f} tokens/s)"
    except Exception as err:  # capture refuses host syncs inside the step: say which
        return f"train step as a CUDA graph: not captured ({type(err).__name__}: {str(err).splitlines()[0][:300]})"


def main() -> None:
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads", flush=True)
    print(f"tiny kernel: {per_launch_us():.1f} us per launch", flush=True)
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=5e-5, fused=True)
    ids = torch.randint(0, 49152, (4, 135), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    threads = torch.get_num_threads()
    eager = step_ms(m, opt, batch)
    tokens = ids.numel()
    print(f"train step, eager, {threads} threads: {eager:.1f} ms ({tokens / eager * 1e3:.0f} tokens/s)", flush=True)
    torch.set_num_threads(1)
    print(f"train step, eager, 1 thread: {step_ms(m, opt, batch):.1f} ms", flush=True)
    torch.set_num_threads(threads)
    with torch.no_grad():  # forward alone: the host's share shows as the gap to the device's time
        for _ in range(3):
            m(**batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            m(**batch)
        torch.cuda.synchronize()
        print(f"forward alone: {(time.perf_counter() - start) / 20 * 1e3:.1f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_ms(m, opt, batch, steps=3)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=8), flush=True)
    print(graphed_step_ms(m, batch), flush=True)  # last: capture leaves the model's grads in the graph's pool


if __name__ == "__main__":
    main()
