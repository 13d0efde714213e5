"""Attention for padding-free training: each packed sequence attends only to itself, causally.

Padding-free batches (TRL's `padding_free`) are one row holding several sequences back to back,
with position ids restarting at each. transformers' SDPA attention then builds a block-diagonal
mask over the whole row and attends every token to all of it: with 4 sequences of ~140 tokens,
4x the scores that count, and the masked kernel, slower than the causal one on CPU. Here each
sequence runs through SDPA alone with `is_causal`: the same maths (tests/test_training_padding_free.py
compares logits and gradients), one fwd+bwd of SmolLM2-135M on 4 packed rows 23% faster in fp32
and 16% in bf16 on a 2-core EPYC (backbone only; docs/performance.md#training-levers).

Anything else (several rows, a KV cache, no position ids) goes to transformers' SDPA unchanged.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED = "smolflow-packed"


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     position_ids=None, **kwargs):
    """SDPA over each sequence of a packed row on its own; transformers' SDPA for anything else."""
    one_packed_row = (position_ids is not None and query.shape[0] == 1 and position_ids.shape[0] == 1
                      and query.shape[2] == key.shape[2] == position_ids.shape[1])
    if not one_packed_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    pos = position_ids[0]
    # A sequence starts at 0 and wherever the position does not follow the previous one (as transformers finds them).
    starts = [0, *((torch.diff(pos) != 1).nonzero().flatten() + 1).tolist(), pos.shape[0]]
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                            dropout_p=dropout, scale=scaling, enable_gqa=True)
             for s, e in pairwise(starts)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)  # the fallback above needs SDPA's mask
