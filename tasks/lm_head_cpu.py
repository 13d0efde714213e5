"""TRL's fused LM head on a CPU, in fewer passes over the logits (issue 16).

TRL's SFTTrainer scores tokens with `trl.kernels.ChunkedLogProbFunction`: per vocabulary tile a
matmul, then (without Triton) about a dozen torch passes over the tile in fp32, and in the backward
two gradient GEMMs per tile in fp32 (`_addmm_fp32`: TRL found that rounding each tile's product to
bf16 and summing the tiles biased training). In a bf16 step on a 2-core EPYC that head was ~35% of
the step. `CpuLogProb` computes the same outputs (log-probs, entropy, is-top-1) from the same
logits:

- one GEMM over the whole vocabulary per token chunk (forward, and again in the backward, as TRL
  recomputes rather than keeps the logits);
- per vocabulary tile, small enough to stay in the cache: the log-sum-exp statistics in four passes
  (max with its index, since is-top-1 means "the target is the first argmax", exp, sum, a dot for
  the entropy), and in the backward the softmax gradient in place in three;
- the two gradient GEMMs once over the whole vocabulary in the compute dtype: the matmul
  accumulates in fp32 and rounds once, as an autocast `nn.Linear`'s backward does, never per tile.

Outputs equal TRL's to float rounding (tests/test_lm_head_cpu.py). Anything else (another device,
a bias, softcapping, other outputs) goes to TRL's function unchanged.
"""

from __future__ import annotations

import torch

TOKENS = 4096  # token rows per chunk, as TRL's TOKEN_CHUNK_SIZE
TILE = 4096  # vocabulary columns per elementwise tile: an fp32 tile of ~500 tokens stays in the L3 cache
KEEP_BYTES = 2**30  # the forward's logits are kept for the backward (one GEMM fewer) up to this size
HANDLED = {"log_probs", "entropy", "is_top1"}


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype


class CpuLogProb(torch.autograd.Function):
    """Per-token log-probs of `hidden @ weight.T` (and entropy, is-top-1) without an fp32 [N, V] tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale: float, outputs: tuple[str, ...]):
        cdt = _compute_dtype(hidden)
        n_all, vocab = hidden.shape[0], weight.shape[0]
        running_max = torch.full((n_all,), float("-inf"))
        sum_exp, x_sum_exp, target_logit = torch.zeros(n_all), torch.zeros(n_all), torch.zeros(n_all)
        best, best_at = torch.full((n_all,), float("-inf")), torch.zeros(n_all, dtype=torch.long)
        w = weight.to(cdt)
        kept = None
        if n_all * vocab * w.element_size() <= KEEP_BYTES:
            kept = torch.empty(n_all, vocab, dtype=cdt)
        with torch.autocast("cpu", enabled=False):  # the dtypes here are chosen, not autocast's
            for t0 in range(0, n_all, TOKENS):
                rows = slice(t0, min(t0 + TOKENS, n_all))
                h = hidden[rows].to(cdt)
                for v0 in range(0, vocab, TILE):
                    product = h @ w[v0 : v0 + TILE].t()
                    if kept is not None:
                        kept[rows, v0 : v0 + TILE] = product
                    z = _scaled(product, scale)
                    top, at = z.max(-1)  # the first maximum's index
                    better = top > best[rows]  # strictly: an earlier tile's tie stays the argmax
                    best[rows] = torch.where(better, top, best[rows])
                    best_at[rows] = torch.where(better, at + v0, best_at[rows])
                    new_max = torch.maximum(running_max[rows], top)
                    rescale = torch.exp(running_max[rows] - new_max)
                    e = z.sub(new_max[:, None]).exp_()
                    sum_exp[rows] = sum_exp[rows] * rescale + e.sum(-1)
                    if "entropy" in outputs:
                        dot = torch.bmm(e[:, None, :], z[:, :, None]).view(-1)
                        x_sum_exp[rows] = x_sum_exp[rows] * rescale + dot
                    running_max[rows] = new_max
                    local = targets[rows] - v0
                    inside = (local >= 0) & (local < z.shape[1])
                    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).view(-1)
                    target_logit[rows] = torch.where(inside, picked, target_logit[rows])
        log_z = running_max + torch.log(sum_exp)
        entropy = log_z - x_sum_exp / sum_exp if "entropy" in outputs else None
        is_top1 = best_at == targets if "is_top1" in outputs else None
        ctx.save_for_backward(hidden, weight, targets, log_z, log_z if entropy is None else entropy)
        ctx.scale, ctx.cdt, ctx.w, ctx.kept = scale, cdt, w, kept  # both ours: nothing else writes them
        if is_top1 is not None:
            ctx.mark_non_differentiable(is_top1)
        ctx.set_materialize_grads(False)
        return target_logit - log_z, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _):
        hidden, weight, targets, log_z, entropy = ctx.saved_tensors
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None
        cdt, scale, w, kept = ctx.cdt, ctx.scale, ctx.w, ctx.kept
        ctx.w = ctx.kept = None  # freed with the backward, as saved tensors are
        n_all, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.zeros(hidden.shape) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.empty if n_all else torch.zeros)(weight.shape) if ctx.needs_input_grad[1] else None
        with torch.autocast("cpu", enabled=False):
            for t0 in range(0, n_all, TOKENS):
                rows = slice(t0, min(t0 + TOKENS, n_all))
                h = hidden[rows].to(cdt)
                g = grad_logprobs[rows].float() if grad_logprobs is not None else None
                ge = grad_entropy[rows].float() if grad_entropy is not None else None
                # In fp32 each tile's gradient GEMM adds into the fp32 sum; in bf16 the tiles' logit
                # gradients are gathered and multiplied once, so the product is rounded once.
                gathered = torch.empty(h.shape[0], vocab, dtype=cdt) if cdt != torch.float32 else None
                for v0 in range(0, vocab, TILE):
                    w_tile = w[v0 : v0 + TILE]
                    product = kept[rows, v0 : v0 + TILE] if kept is not None else h @ w_tile.t()
                    log_p = _scaled(product, scale).sub_(log_z[rows, None])
                    if ge is None:  # d log p_target / dz_j = 1[j = target] - p_j
                        d = log_p.exp_().mul_(-g[:, None])
                    else:  # and d entropy / dz_j = -p_j (log p_j + entropy)
                        p = log_p.exp()
                        d = log_p.add_(entropy[rows, None]).mul_(p).mul_(-ge[:, None])
                        if g is not None:
                            d.sub_(p.mul_(g[:, None]))
                    if g is not None:
                        local = targets[rows] - v0
                        inside = ((local >= 0) & (local < d.shape[1])).nonzero().view(-1)
                        d[inside, local[inside]] += g[inside]
                    if scale != 1.0:
                        d.mul_(scale)
                    d = d.to(cdt)
                    if grad_weight is not None and t0 == 0:
                        grad_weight[v0 : v0 + TILE] = d.t() @ h
                    elif grad_weight is not None:
                        grad_weight[v0 : v0 + TILE] += d.t() @ h
                    if grad_hidden is not None and gathered is None:
                        grad_hidden[rows].addmm_(d, w_tile)
                    elif grad_hidden is not None:
                        gathered[:, v0 : v0 + TILE] = d
                if grad_hidden is not None and gathered is not None:
                    grad_hidden[rows] += gathered @ w
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None)


def _scaled(product: torch.Tensor, scale: float) -> torch.Tensor:
    """A tile of logits, scaled, as a fresh fp32 tensor (callers work on it in place)."""
    z = product.float() if product.dtype != torch.float32 else product.clone()
    return z.mul_(scale) if scale != 1.0 else z


class Dispatch:
    """Stands in for TRL's ChunkedLogProbFunction: `CpuLogProb` where it applies, TRL's function elsewhere."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcapping=None, logit_scale=1.0,
              outputs=("log_probs",)):
        if hidden.device.type != "cpu" or bias is not None or softcapping is not None or set(outputs) - HANDLED:
            from trl.kernels import ChunkedLogProbFunction

            return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, softcapping,
                                                logit_scale, outputs)
        logprobs, entropy, is_top1 = CpuLogProb.apply(hidden, weight, targets, logit_scale / temperature,
                                                      tuple(outputs))
        return logprobs, entropy, None, None, is_top1


def score_labelled_only(on: bool) -> bool:
    """TRL's fused LM head scores only the positions that have a label on Triton devices and every
    position elsewhere (a Neuron device would recompile for each new count). A CPU's eager kernels
    have no shapes to keep: on, the CPU scores the labelled positions only too, so the prompt tokens
    of a completion-only or assistant-only loss, and a padded batch's padding, cost no LM-head GEMMs.
    The loss and gradients are the same: an unlabelled position's outputs are zeros either way."""
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton

    if getattr(trl_utils, "_use_triton", None) not in (_use_triton, _labelled_only_on_cpu):
        return False  # a TRL that decides this otherwise: left alone
    trl_utils._use_triton = _labelled_only_on_cpu if on else _use_triton
    return on


def _labelled_only_on_cpu(device: torch.device) -> bool:
    from trl.kernels.chunked_logprob import _use_triton

    return device.type == "cpu" or _use_triton(device)


def install(on: bool) -> bool:
    """Route TRL's fused LM head through `Dispatch` (on) or back to TRL's function (off); whether it is on."""
    import trl.trainer.utils as trl_utils
    from trl.kernels import ChunkedLogProbFunction

    if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        return False  # a TRL without the fused head: nothing to replace
    trl_utils._ChunkedLogProbFunction = Dispatch if on else ChunkedLogProbFunction
    return on
