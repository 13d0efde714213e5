"""Training levers for the CPU, applied where they pay and recorded in training/trainer_args.json.

- Per-sequence attention for padding-free batches (tasks/packed_attention.py): the same maths as
  transformers' block-diagonal mask, without the scores that the mask throws away. On a GPU a
  short probe decides (on the H200 measured, each call's host time outweighed the scores saved).
- With bf16 autocast, that attention in fp32 where a probe finds the CPU's SDPA kernel faster in
  fp32 (it ran 2x slower in bf16 than in fp32 on a Zen 4 EPYC with bf16 units).
- TRL's fused LM head. TRL scores tokens against 32,768 vocabulary rows at a time (tuned for its
  Triton kernel); on a CPU its torch fallback then makes ~a dozen fp32 passes over a tokens x
  32,768 tile, which falls out of the caches: with SmolLM2's 49k vocabulary and 570 tokens, 1.97 s
  of a 5.4 s bf16 step on a 2-core EPYC, 0.94 s at 4,096 rows (results equal to 1e-6). smolflow's
  own CPU head (tasks/lm_head_cpu.py: fewer passes, the logits kept for the backward, bf16
  gradient GEMMs rounded once) is faster again. Which of the three pays depends on the CPU, so a
  short probe on this machine decides (cached per machine, model shape and precision).
- Freed memory kept in the process while training on a CPU (glibc's malloc only, tasks/memory.py).
  glibc returns a block of more than ~32 MB (TRL's 113 MB LM-head gradient, the weight casts) to the kernel when
  it is freed, so the next step takes fresh pages and the kernel zeroes each one: ~80,000 page
  faults and ~0.35 s of system time per bf16 step on the 2-core EPYC, 12% of the step. Kept, the
  next step reuses them. Kept blocks fragment the heap (RSS +~200 MB over 40 steps), so every
  TRIM_EVERY steps the free pages go back to the kernel (the next step faults once), and at the end
  glibc's defaults come back. Same maths.
"""

from __future__ import annotations

import functools

from pydantic import BaseModel

from tasks.device import cached_on_machine, race
from tasks.memory import TRIM_EVERY, freed_memory_kept, glibc  # noqa: F401 (training's levers, named here)

TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE as TRL ships it
CPU_CHUNK = 4096
PROBE_TOKENS = 512  # about one padding-free step of 4 conversations


class HeadProbe(BaseModel):
    """Seconds of one fwd+bwd of TRL's chunked LM head at TRL's chunk and at CPU_CHUNK, and of smolflow's."""

    trl_s: float
    cpu_s: float
    smolflow_s: float

    @property
    def chunk(self) -> int:
        return CPU_CHUNK if self.cpu_s < 0.9 * self.trl_s else TRL_CHUNK  # a 10% margin, as the bf16 probe

    @property
    def ours(self) -> bool:
        return self.smolflow_s < 0.9 * min(self.trl_s, self.cpu_s)


def lm_head_pass(vocab: int, hidden: int, bf16: bool, chunk: int, ours: bool = False, tokens: int | None = None):
    """One fwd+bwd of TRL's ChunkedLogProbFunction at `chunk` vocabulary rows (or smolflow's), as a callable."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from tasks.lm_head_cpu import Dispatch

    function = Dispatch if ours else ChunkedLogProbFunction
    g = torch.Generator().manual_seed(0)
    tokens = tokens or PROBE_TOKENS
    h = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    w = (0.02 * torch.randn(vocab, hidden, generator=g)).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=g)

    def run():
        h.grad = w.grad = None  # each pass writes its gradients afresh, as a training step's first micro-batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logprobs = function.apply(h, w, None, targets, 1.0, chunk, None, 1.0, ("entropy", "is_top1"))[0]
        logprobs.sum().backward()

    return run


class PackingProbe(BaseModel):
    """Seconds of SDPA fwd+bwd over one padding-free row of 4 sequences: one call per sequence, and
    one over the block-diagonal mask."""

    per_sequence_s: float
    block_mask_s: float

    @property
    def per_sequence(self) -> bool:
        return self.per_sequence_s < self.block_mask_s


class AttentionProbe(BaseModel):
    """Seconds of SDPA fwd+bwd over one 140-token sequence, in bf16 and in fp32."""

    bf16_s: float
    fp32_s: float

    @property
    def upcast(self) -> bool:
        return self.fp32_s < 0.9 * self.bf16_s


@functools.cache
def head_probe(vocab: int, hidden: int, bf16: bool) -> HeadProbe:
    """The LM-head probe once per process, once per machine and shape on disk (~5-10 s for a 49k vocabulary).

    Timed as the precision probe is (`race`: one thread, the three alternating, CPU time): timed one
    after the other on the run's threads in wall time, beside CI's tests TRL's two chunks swapped
    places from one probe to the next, and a probe's result is kept for good."""

    def measure() -> HeadProbe:
        t = race({"trl_s": lm_head_pass(vocab, hidden, bf16, TRL_CHUNK),
                  "cpu_s": lm_head_pass(vocab, hidden, bf16, CPU_CHUNK),
                  "smolflow_s": lm_head_pass(vocab, hidden, bf16, CPU_CHUNK, ours=True)}, rounds=2)
        return HeadProbe(**t)

    return cached_on_machine(f"lm-head-1t-{vocab}x{hidden}-{'bf16' if bf16 else 'fp32'}", HeadProbe, measure,
                             quiet_only=True)


@functools.cache
def packing_probe(device: str, bf16: bool) -> PackingProbe:
    """The packed-attention probe on a GPU, once per process, once per machine and GPU on disk (~0.1 s).

    One call per sequence skips the scores the mask throws away (4 sequences: three quarters of
    them), which pays on CPUs. On the first GPU lent (an H200) it made a training step 4x slower:
    cuDNN spent ~1-2 ms of host time a call planning for each sequence length it had not seen
    (docs/performance.md#gpu)."""
    import torch

    from tasks.packed_attention import time_packing

    where = device if device != "cuda" else "cuda-" + "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name())
    dtype = torch.bfloat16 if bf16 else torch.float32
    return cached_on_machine(f"packing-{where}-{'bf16' if bf16 else 'fp32'}", PackingProbe,
                             lambda: PackingProbe(**dict(zip(("per_sequence_s", "block_mask_s"), time_packing(device, dtype)))))


@functools.cache
def attention_probe() -> AttentionProbe:
    """The attention-precision probe once per process, once per machine on disk (~0.1 s; timed by `race`)."""
    import torch

    from tasks.packed_attention import attention_pass

    return cached_on_machine("attention-1t", AttentionProbe, lambda: AttentionProbe(**race(
        {"bf16_s": attention_pass(torch.bfloat16), "fp32_s": attention_pass(torch.float32)}, rounds=5)),
        quiet_only=True)


def trim_callback(on: bool, every: int = TRIM_EVERY):
    """A TrainerCallback giving the free pages back every `every` steps (bounds the kept heap), or None."""
    from transformers import TrainerCallback

    libc = glibc() if on else None
    if libc is None:
        return None

    class TrimFreedMemory(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                libc.malloc_trim(0)

    return TrimFreedMemory()


def apply(model, padding_free: bool, device: str, bf16: bool, enabled: bool = True) -> dict:
    """Set the levers that pay here on `model` and TRL; return what was set and why (for trainer_args.json).

    `enabled=False` sets TRL's and transformers' defaults (scripts/bench_training.py's baseline rows).
    """
    import trl.trainer.utils as trl_utils

    from tasks import lm_head_cpu, packed_attention

    levers: dict = {}
    packed_attention.UPCAST = False  # set below where it pays; not while the packing probe runs
    if padding_free and model.config._attn_implementation in ("sdpa", packed_attention.PACKED):
        # On a CPU per sequence, as measured over whole steps on both CPUs (16-23% faster; on bf16 units with
        # the fp32 upcast below). On a GPU the kernel library decides what a call costs, so a probe does.
        per_sequence = enabled and device == "cpu"
        if enabled and device != "cpu":
            packing = packing_probe(device, bf16)
            per_sequence = packing.per_sequence
            levers["attention_reason"] = (f"{device} probe: SDPA fwd+bwd over 4 packed sequences "
                                          f"{packing.per_sequence_s * 1e3:.2f} ms one call per sequence vs "
                                          f"{packing.block_mask_s * 1e3:.2f} ms over the block mask")
        model.config._attn_implementation = packed_attention.PACKED if per_sequence else "sdpa"
    levers["attention"] = model.config._attn_implementation
    if levers["attention"] == packed_attention.PACKED and device == "cpu" and bf16:
        probe = attention_probe()
        packed_attention.UPCAST = probe.upcast
        levers["attention_fp32_under_bf16"] = probe.upcast
        levers["attention_reason"] = (f"CPU probe: SDPA fwd+bwd {probe.fp32_s * 1e3:.2f} ms in fp32 vs "
                                      f"{probe.bf16_s * 1e3:.2f} ms in bf16 (1 thread, CPU time)")
    chunk, head, why = TRL_CHUNK, "trl", "TRL's default"
    if device == "cpu" and enabled and hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        config = model.config.get_text_config()
        probe = head_probe(config.vocab_size, config.hidden_size, bf16)
        chunk, head = probe.chunk, "smolflow-cpu" if probe.ours else "trl"
        why = (f"CPU probe: fused LM head fwd+bwd {probe.smolflow_s:.2f} s smolflow's; TRL's {probe.cpu_s:.2f} s "
               f"at {CPU_CHUNK} vocabulary rows, {probe.trl_s:.2f} s at {TRL_CHUNK} (1 thread, CPU time)")
    if hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = chunk  # read by TRL's LM head at every forward
    levers["lm_head"] = head if lm_head_cpu.install(head == "smolflow-cpu") else "trl"
    levers["lm_head_vocab_chunk"] = chunk
    levers["lm_head_reason"] = why
    levers["lm_head_scores"] = "labelled" if lm_head_cpu.score_labelled_only(enabled and device == "cpu") else "every"
    levers["freed_memory_kept"] = enabled and device == "cpu" and glibc() is not None  # see freed_memory_kept
    return levers
