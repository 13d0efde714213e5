"""Off the CPU: do smolflow-hf's packed scoring passes pay on this device and model? A short probe says.

On CPUs the packed passes (fast_lm.py: a shared prefix computed once, several contexts back to back
in one row, logits only where scored) ran MMLU at 4-17x lm-eval's HF backend (docs/performance.md).
On the first GPU lent (an H200, SmolLM2-135M, bf16) they ran at 0.39-0.44x: there the host's work
per item outweighs the compute saved. Which way a GPU goes depends on the GPU and the model's size,
so on a GPU the engine times both on MMLU-shaped requests once per model, ~1 s, and keeps the faster.
"""

from __future__ import annotations

import time
import weakref

import torch
from lm_eval.models.huggingface import HFLM

ITEMS, HEADER, OWN, CHOICES = 16, 48, 80, 4  # a subject's header, questions of ~OWN tokens, four one-token answers

_found: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (packed s, HFLM s)


def time_scoring(lm, packed) -> tuple[float, float]:
    """Best seconds of ITEMS MMLU-shaped items through `packed(requests)` and through HFLM's batches."""
    g = torch.Generator().manual_seed(0)
    vocab = lm.model.config.get_text_config().vocab_size

    def tokens(n: int) -> list[int]:
        return torch.randint(100, vocab, (n,), generator=g).tolist()

    header, answers = tokens(HEADER), tokens(CHOICES)
    device = torch.device(lm.device)
    best = [float("inf"), float("inf")]
    for rep in range(3):  # the first: warm-up (kernel selection, allocations)
        # Questions of new lengths every pass, as real items bring (a GPU's kernels may plan per shape).
        own = [tokens(int(n)) for n in torch.randint(OWN // 2, 2 * OWN, (ITEMS,), generator=g)]
        requests = [(None, header + q, [a]) for q in own for a in answers]
        for i, run in enumerate((lambda: packed(requests), lambda: HFLM._loglikelihood_tokens(lm, requests, True))):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep:
                best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def packs_scoring(lm, packed) -> tuple[bool, str]:
    """(whether the packed passes score `lm`'s requests, why): on a CPU always, elsewhere the probe's pick."""
    if torch.device(lm.device).type == "cpu":
        return True, "CPU: packed passes (MMLU 4-17x HFLM's speed on the CPUs measured)"
    if lm.model not in _found:
        _found[lm.model] = time_scoring(lm, packed)
    packed_s, hflm_s = _found[lm.model]
    return packed_s < hflm_s, (f"{torch.device(lm.device).type} probe, {ITEMS} MMLU-shaped items: packed passes "
                               f"{packed_s * 1e3:.0f} ms, HFLM batches {hflm_s * 1e3:.0f} ms")
