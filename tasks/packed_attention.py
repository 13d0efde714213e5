"""Attention for padding-free training: each packed sequence attends only to itself, causally.

Padding-free batches (TRL's `padding_free`) are one row holding several sequences back to back,
with position ids restarting at each. transformers' SDPA attention then builds a block-diagonal
mask over the whole row and attends every token to all of it: with 4 sequences of ~140 tokens,
4x the scores that count, and the masked kernel, slower than the causal one on CPU. Here each
sequence runs through SDPA alone with `is_causal`: the same maths (tests/test_training_padding_free.py
compares logits and gradients), one fwd+bwd of SmolLM2-135M on 4 packed rows 23% faster in fp32
and 16% in bf16 on a 2-core EPYC (backbone only; docs/performance.md#training-here).

Anything else (several rows, a KV cache, no position ids) goes to transformers' SDPA unchanged.
"""

from __future__ import annotations

from contextlib import nullcontext
from itertools import pairwise

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED = "smolflow-packed"


# Set by tasks/train_levers.py where its probe finds SDPA faster in fp32 than in bf16 on this CPU
# (the CPU flash kernel in bf16 ran 2x slower than in fp32 on a Zen 4 EPYC): bf16 inputs are then
# attended in fp32, which is also the more precise of the two.
UPCAST = False


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     position_ids=None, **kwargs):
    """SDPA over each sequence of a packed row on its own; transformers' SDPA for anything else."""
    one_packed_row = (position_ids is not None and query.shape[0] == 1 and position_ids.shape[0] == 1
                      and query.shape[2] == key.shape[2] == position_ids.shape[1])
    if not one_packed_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    lengths = _lengths(position_ids)
    dtype = query.dtype
    # Under autocast SDPA runs in bf16 even on fp32 inputs (RoPE leaves q and k in fp32).
    upcast = UPCAST and query.device.type == "cpu" and (dtype != torch.float32 or torch.is_autocast_enabled("cpu"))
    with torch.autocast(query.device.type, enabled=False) if upcast else nullcontext():
        if upcast:
            query, key, value = query.float(), key.float(), value.float()
        # split, not slices: the backward of a split concatenates, a slice's fills a zero tensor per part
        parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling,
                                                enable_gqa=True)
                 for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(parts, dim=2).to(dtype).transpose(1, 2).contiguous(), None


_last: tuple = (None, [])  # (position_ids, their lengths): every layer of one forward gets the same tensor


def _lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the sequences in one packed row, found once per forward: on a GPU `.tolist()` waits
    for the device, which once per layer would stall the kernel queue 30 times a step."""
    global _last
    if position_ids is not _last[0]:  # held here, so no other tensor can have its identity
        pos = position_ids[0]
        # A sequence starts at 0 and wherever the position does not follow the previous one (as transformers finds them).
        starts = [0, *((torch.diff(pos) != 1).nonzero().flatten() + 1).tolist(), pos.shape[0]]
        _last = (position_ids, [e - s for s, e in pairwise(starts)])
    return _last[1]


def attention_pass(dtype, length: int = 140):
    """One fwd+bwd of SDPA over one causal sequence of `length` tokens (SmolLM2's heads), as a callable."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, length, 64, generator=g).to(dtype).requires_grad_(True)
    k, v = (torch.randn(1, 3, length, 64, generator=g).to(dtype).requires_grad_(True) for _ in range(2))

    def run():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    return run


def time_packing(device: str, dtype, reps: int = 3) -> tuple[float, float]:
    """Best fwd+bwd seconds of one padding-free row of 4 sequences (SmolLM2's heads): (this module's
    one call per sequence, transformers' SDPA over the block-diagonal mask). Each pass draws new
    sequence lengths, as training's batches bring: a GPU's kernel library may plan per new shape."""
    import time
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    on_gpu = torch.device(device).type == "cuda"
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=True)
    best = [float("inf"), float("inf")]
    for rep in range(reps + 1):  # the first: kernel selection, not timed
        lengths = torch.randint(100, 180, (4,), generator=g).tolist()
        n = sum(lengths)
        pos = torch.cat([torch.arange(k) for k in lengths])[None].to(device)
        seq = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))  # built here, then moved
        mask = ((seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool).tril())[None, None].to(device)
        q = torch.randn(1, 9, n, 64, generator=g).to(device, dtype).requires_grad_(True)
        k, v = (torch.randn(1, 3, n, 64, generator=g).to(device, dtype).requires_grad_(True) for _ in range(2))
        for i, run in enumerate((lambda: packed_attention(module, q, k, v, None, position_ids=pos),
                                 lambda: sdpa_attention_forward(module, q, k, v, mask))):
            if on_gpu:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.enable_grad():  # a backward is half of what it times, whatever the caller's mode
                run()[0].sum().backward()
            if on_gpu:
                torch.cuda.synchronize(device)
            if rep:
                best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


AttentionInterface.register(PACKED, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)  # the fallback above needs SDPA's mask
