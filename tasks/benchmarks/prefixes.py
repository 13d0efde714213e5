"""How requests share prompt prefixes: grouping, batching, and attention over a prefix stored once.

The bookkeeping behind `SharedPrefixLM` (fast_lm.py): which scoring contexts share a few-shot block
(`prefix_groups`) and how they fill forward passes (`scoring_passes`), which generation prompts
go in one batch (`prompt_batches`), and the attention
that lets a batch keep a shared prefix's keys and values once (`shared_prefix_attention`).
"""

from __future__ import annotations

from itertools import pairwise

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

CASCADE = "smolflow-shared-prefix"  # shared_prefix_attention, registered with transformers
SEGMENTS = "smolflow-segments"  # segment_attention, registered with transformers
# Below this many shared tokens a separate prefix forward costs more than it saves (generation).
MIN_SHARED = 16
# What a separate group of scoring contexts costs beyond its tokens, in tokens: its own forward
# passes, smaller ones (probe, fp32, 1 thread: a one-row pass of 42 tokens took as long as ~67
# tokens take in a full pass).
GROUP_COST = 32
MAX_DEPTH = 64  # levels of nested sharing prefix_groups looks into (MMLU: a handful)
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
    """Contexts in groups that share a prefix, chosen to compute the fewest tokens: (shared, members).

    Sorted contexts form a tree: a run shares what its members all start with, and splits where
    that common start ends into runs that share more. Each run either joins its parent's group
    (computing its members from the parent's prefix on) or becomes groups of its own, whichever
    costs fewer tokens, counting `GROUP_COST` per group for its extra forward passes. So MMLU
    0-shot shares each subject's ~15-token header across its ~250 questions (not only the
    questions that happen to start with the same word, in one-row passes); 5-shot shares each
    subject's few-shot block; questions that share a long passage share it too; and contexts
    sharing nothing worth it fill full passes together (shared 0). Every member keeps at least
    one token of its own (its last position gives the logits of the first continuation token).
    """
    ctxs = sorted(contexts)
    # Common prefix of neighbours, each side keeping a token of its own.
    lcp = [min(common_prefix(a, b), len(a) - 1, len(b) - 1) for a, b in pairwise(ctxs)]
    tokens = [len(c) for c in ctxs]

    def plan(lo: int, hi: int, outer: int, depth: int) -> tuple[int, int, list]:
        """ctxs[lo:hi], which share `shared` = min(lcp) >= outer: (cost if joined to a group
        sharing `outer`, cost on their own, their own groups)."""
        joined = sum(tokens[lo:hi]) - (hi - lo) * outer
        if hi - lo == 1:
            return joined, tokens[lo] + GROUP_COST, [(0, [ctxs[lo]])]
        shared = min(lcp[lo : hi - 1])
        if depth == MAX_DEPTH:  # nested deeper than real prompts are (contexts each a prefix of the next): one group
            return joined, sum(tokens[lo:hi]) - (hi - lo - 1) * shared + GROUP_COST, [(shared, ctxs[lo:hi])]
        cuts = [lo, *(i + 1 for i in range(lo, hi - 1) if lcp[i] == shared), hi]
        pool, cost, groups = [], 0, []
        for a, b in pairwise(cuts):
            child_joined, child_alone, child_groups = plan(a, b, shared, depth + 1)
            if child_joined <= child_alone:
                pool.extend(ctxs[a:b])
                cost += child_joined
            else:
                groups.extend(child_groups)
                cost += child_alone
        if pool:
            cost += shared + GROUP_COST
            groups.append((shared, pool))
        return joined, cost, groups

    if not ctxs:
        return []
    return [(s if len(m) > 1 else 0, m) for s, m in plan(0, len(ctxs), 0, 0)[2]]


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


def scoring_passes(lengths: list[int], rows: int) -> list[list[int]]:
    """Forward passes (indices into `lengths`, sorted longest first), each holding at most the
    tokens of `rows` rows as wide as its first item.

    The items of a pass go back to back in one row (`segment_attention` keeps them apart), so none
    of it is padding; rows padded to their pass's longest item left 5-17% of MMLU's passes padding.
    """
    passes: list[list[int]] = []
    i = 0
    while i < len(lengths):
        budget, used, chunk = rows * lengths[i], 0, []
        while i < len(lengths) and used + lengths[i] <= budget:
            used += lengths[i]
            chunk.append(i)
            i += 1
        passes.append(chunk)
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
    return masked_sdpa(query, keys, values, mask, scaling).transpose(1, 2).contiguous()


def masked_sdpa(query, key, value, mask, scaling, grouped: bool | None = None):
    """SDPA over fewer kv heads than query heads, with a mask. On a CPU SDPA groups the heads itself
    (`enable_gqa`); on CUDA a mask with `enable_gqa` falls back to SDPA's math kernel (transformers'
    `use_gqa_in_sdpa` says when), so there each kv head is repeated for its query heads first."""
    if grouped is None:
        grouped = query.device.type == "cpu" or use_gqa_in_sdpa(mask, key, value)
    if not grouped:
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                            enable_gqa=grouped)


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=None,
                      **kwargs):
    """Attention for one row holding several independent items back to back (scoring passes).

    An item sees the shared prefix and its own tokens, never another item, so each `segments`
    entry (start, length, its additive mask over [prefix, own]) gets one SDPA call over those
    keys alone. One call over the whole row would compute every query against every key of the
    row, nearly all of them masked (a row of 11 x 516 tokens holding 50 MMLU questions spent a
    seventh of its time there), and its mask would grow with the square of the row.
    """
    if segments is None:  # without them the items would attend to each other: never a silent wrong score
        raise RuntimeError(f"{type(module).__name__} did not pass the forward's keyword arguments to its attention, "
                           "so smolflow-hf cannot keep packed items apart; score this model with lm-eval's 'hf' backend")
    shared = key.shape[2] - query.shape[2]  # the prefix's keys come first in the row's cache
    out = torch.empty_like(query)
    for start, length, mask in segments:
        own, queries = slice(shared + start, shared + start + length), slice(start, start + length)
        keys = torch.cat([key[:, :, :shared], key[:, :, own]], dim=2)
        values = torch.cat([value[:, :, :shared], value[:, :, own]], dim=2)
        out[:, :, queries] = masked_sdpa(query[:, :, queries], keys, values, mask, scaling)  # 4D: SDPA's fused CPU kernel
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(CASCADE, shared_prefix_attention)
AttentionInterface.register(SEGMENTS, segment_attention)
