"""How requests share prompt prefixes: grouping, batching, and attention over a prefix stored once.

The bookkeeping behind `SharedPrefixLM` (fast_lm.py): which scoring contexts share a few-shot block
(`prefix_groups`) and how they fill a forward pass's rows (`pack_rows`), which generation prompts
go in one batch (`prompt_batches`), and the attention
that lets a batch keep a shared prefix's keys and values once (`shared_prefix_attention`).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CASCADE = "smolflow-shared-prefix"  # shared_prefix_attention, registered with transformers
# Below this many shared tokens a separate prefix forward costs more than it saves.
MIN_SHARED = 16
# Generation batches whose prompts share fewer characters than this (about MIN_SHARED tokens) share nothing.
LOOSE = 4 * MIN_SHARED


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token lists (or strings)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_groups(contexts: list[tuple[int, ...]]) -> list[tuple[int, list[tuple[int, ...]]]]:
    """Sorted contexts cut into runs that share a prefix: (shared length, members) per run.

    Every member keeps at least one token of its own (its last position gives the logits of the
    first continuation token). A run is cut where joining it would halve what it shares.
    """
    groups: list[tuple[int, list]] = []
    members: list[tuple[int, ...]] = []
    shared = 0
    for ctx in sorted(contexts):
        if members:
            joined = min(shared, common_prefix(members[-1], ctx), len(ctx) - 1)
            if joined >= MIN_SHARED and (len(members) == 1 or 2 * joined >= shared):
                members.append(ctx)
                shared = joined
                continue
            groups.append((shared, members))
        members, shared = [ctx], len(ctx) - 1
    if members:
        groups.append((shared, members))
    return [(s if len(m) > 1 and s >= MIN_SHARED else 0, m) for s, m in groups]


def prompt_batches(prompts: list[str], size: int) -> list[list[int]]:
    """Indices of `prompts` in batches of at most `size`, sorted, each cut at a change of prefix.

    Sorted prompts with the same few-shot block sit together; a batch is also cut where the next
    prompt would shrink the text the batch shares to under half (one BBH task's 3-shot block ends
    and the next task's begins), so a batch never mixes two blocks and loses its shared prefix.
    """
    batches: list[list[int]] = []
    shares: list[int] = []  # characters each batch's prompts share
    for i in sorted(range(len(prompts)), key=prompts.__getitem__):
        if batches and len(batches[-1]) < size:
            joined = min(shares[-1], common_prefix(prompts[batches[-1][-1]], prompts[i]))
            if len(batches[-1]) == 1 or 2 * joined >= shares[-1]:
                batches[-1].append(i)
                shares[-1] = joined
                continue
        batches.append([i])
        shares.append(len(prompts[i]))
    # Prompts that share next to nothing (GSM8K draws each item's shots) gain nothing from text order:
    # they go in batches by length instead, longest first as HFLM does, so little of a batch is padding.
    loose = sorted((i for b, s in zip(batches, shares) if len(b) > 1 and s < LOOSE for i in b),
                   key=lambda i: -len(prompts[i]))
    kept = [b for b, s in zip(batches, shares) if len(b) == 1 or s >= LOOSE]
    return [loose[k : k + size] for k in range(0, len(loose), size)] + kept


def pack_rows(lengths: list[int], rows: int) -> list[list[list[int]]]:
    """Forward passes of at most `rows` rows, each row items back to back (indices into `lengths`,
    sorted longest first), none wider than the pass's first item (first fit).

    Sorting alone leaves the long end of a group padded (8 rows of 400, 300, ..., 170 tokens); here
    shorter items fill the rows a longer one left room in, so less of a pass is padding.
    """
    passes: list[list[list[int]]] = []
    i = 0
    while i < len(lengths):
        width, used, packed = lengths[i], [], []
        while i < len(lengths):
            row = next((r for r, u in enumerate(used) if u + lengths[i] <= width), None)
            if row is None and len(used) == rows:
                break
            if row is None:
                used.append(0)
                packed.append([])
                row = len(used) - 1
            used[row] += lengths[i]
            packed[row].append(i)
            i += 1
        passes.append(packed)
    return passes


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_kv=None, **kwargs):
    """Attention over a prompt prefix that every row shares, stored once, plus each row's own keys.

    Generation keeps the few-shot block's keys and values once, not once per row: a decode step
    reads them once for the whole batch (one matmul over every row's queries) instead of copying
    and reading each row's own copy, so a batch of 32 costs little more than one of 8. One softmax
    over [prefix, own] keys: the arithmetic of attention over the full cache. Query heads are
    grouped by their kv head (grouped-query attention) instead of repeating the keys.
    A prefill of the rows' own tokens (many queries per row) instead runs SDPA over each row's
    [prefix, own] keys (`_prefill_attention`): there the scores, not the keys, are what costs.
    Without `shared_kv` (any other forward pass) this is transformers' SDPA attention.
    """
    if shared_kv is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    prefix_k, prefix_v = shared_kv[module.layer_idx]  # (kv heads, prefix length, head dim)
    rows, heads, q, dim = query.shape
    if q > 1:  # prefill of the rows' own tokens: SDPA's fused kernel over [prefix, own] keys
        return _prefill_attention(query, key, value, attention_mask, prefix_k, prefix_v, scaling), None
    kv_heads, length = prefix_k.shape[0], prefix_k.shape[1]
    group = heads // kv_heads  # query heads per kv head, next to each other in `heads`
    grouped = (query * scaling).reshape(rows, kv_heads, group * q, dim)
    # Every row's queries of one kv head in one (rows*group*q, dim) x (dim, prefix) matmul.
    flat = grouped.transpose(0, 1).reshape(kv_heads, rows * group * q, dim)
    on_prefix = (flat @ prefix_k.transpose(1, 2)).reshape(kv_heads, rows, group * q, length).transpose(0, 1)
    on_own = grouped @ key.transpose(2, 3)  # (rows, kv heads, group*q, own length)
    on_own = (on_own.reshape(rows, kv_heads, group, q, -1) + attention_mask[:, :, None]).reshape(on_own.shape)
    probs = torch.softmax(torch.cat([on_prefix, on_own], dim=-1), dim=-1, dtype=torch.float32)
    probs = probs.to(query.dtype)
    out = probs[..., length:] @ value  # (rows, kv heads, group*q, dim)
    p = probs[..., :length].transpose(0, 1).reshape(kv_heads, rows * group * q, length)
    out = out + (p @ prefix_v).reshape(kv_heads, rows, group * q, dim).transpose(0, 1)
    return out.reshape(rows, heads, q, dim).transpose(1, 2).contiguous(), None


def _prefill_attention(query, key, value, attention_mask, prefix_k, prefix_v, scaling):
    """Many queries per row: each row gets its own copy of the prefix keys (a few MB per layer)
    and one SDPA call, whose fused kernel never materializes the scores. The one-matmul path above
    builds (rows, heads, queries, prefix + own) scores, concatenates and soft-maxes them: on BBH's
    prefill (32 rows x ~190 own tokens behind a 513-token block, fp32) it ran 656 ms per layer
    against 174 here, outputs equal to 5e-7."""
    rows, length = query.shape[0], prefix_k.shape[1]
    keys = torch.cat([prefix_k.expand(rows, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix_v.expand(rows, -1, -1, -1), value], dim=2)
    mask = torch.cat([attention_mask.new_zeros(*attention_mask.shape[:-1], length), attention_mask], dim=-1)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(CASCADE, shared_prefix_attention)
