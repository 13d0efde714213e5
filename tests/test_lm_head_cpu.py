"""smolflow's CPU LM head (tasks/lm_head_cpu.py) against TRL's ChunkedLogProbFunction, which it replaces."""

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

from tasks import lm_head_cpu
from tasks.lm_head_cpu import Dispatch

OUTPUTS = ("log_probs", "entropy", "is_top1")


def _inputs(tokens=70, vocab=2500, hidden=48):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(tokens, hidden, generator=g), 0.2 * torch.randn(vocab, hidden, generator=g)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    top = (h @ w.t()).argmax(-1)
    targets[::2] = top[::2]  # half the targets are the argmax: is_top1 is exercised both ways
    return h, w, targets


def _run(function, h0, w0, targets, bf16=False, temperature=1.0, entropy_weight=0.0, outputs=OUTPUTS):
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logprobs, entropy, _, mean, top1 = function.apply(h, w, None, targets, temperature, 1000, None, 1.0, outputs)
    (-logprobs.sum() + entropy_weight * entropy.sum()).backward()
    return {"logprobs": logprobs.detach(), "entropy": entropy.detach(), "top1": top1, "mean_logits": mean,
            "grad_hidden": h.grad, "grad_weight": w.grad}


@pytest.mark.parametrize("keep", [True, False], ids=["logits-kept", "recomputed"])
@pytest.mark.parametrize("temperature,entropy_weight", [(1.0, 0.0), (0.7, 0.3)])
def test_fp32_equals_trl(monkeypatch, keep, temperature, entropy_weight):
    """In fp32: TRL's log-probs, entropy, top-1 flags and gradients, over several token chunks and vocabulary tiles."""
    monkeypatch.setattr(lm_head_cpu, "TOKENS", 32)  # 70 tokens: three chunks, the last one partial
    monkeypatch.setattr(lm_head_cpu, "TILE", 1000)  # 2,500 columns: three tiles, the last one partial
    monkeypatch.setattr(lm_head_cpu, "KEEP_BYTES", 2**30 if keep else 0)
    h, w, targets = _inputs()
    ours = _run(Dispatch, h, w, targets, temperature=temperature, entropy_weight=entropy_weight)
    trl = _run(ChunkedLogProbFunction, h, w, targets, temperature=temperature, entropy_weight=entropy_weight)
    assert torch.equal(ours["top1"], trl["top1"]) and 0 < int(trl["top1"].sum()) < len(targets)
    for key in ("logprobs", "entropy", "grad_hidden", "grad_weight"):
        torch.testing.assert_close(ours[key], trl[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bf16_autocast_equals_trl_to_bf16_rounding():
    """Under bf16 autocast: the same outputs (fp32 statistics of the same bf16 logits); the gradients
    differ from TRL's only by one bf16 rounding of the product (TRL sums tiles in fp32)."""
    h, w, targets = _inputs(tokens=200, vocab=9000, hidden=64)
    ours, trl = _run(Dispatch, h, w, targets, bf16=True), _run(ChunkedLogProbFunction, h, w, targets, bf16=True)
    assert torch.equal(ours["top1"], trl["top1"])
    torch.testing.assert_close(ours["logprobs"], trl["logprobs"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["entropy"], trl["entropy"], rtol=1e-5, atol=1e-5)
    for key in ("grad_hidden", "grad_weight"):
        scale = trl[key].abs().max()
        assert (ours[key] - trl[key]).abs().max() <= 2**-7 * scale, key  # bf16 keeps 8 significant bits
        assert torch.nn.functional.cosine_similarity(ours[key].flatten(), trl[key].flatten(), dim=0) > 0.9999, key


def test_what_it_does_not_cover_goes_to_trl():
    """Outputs it does not compute (mean_logits here) are TRL's own results, through the same call."""
    h, w, targets = _inputs()
    outputs = (*OUTPUTS, "mean_logits")
    ours = _run(Dispatch, h, w, targets, outputs=outputs)
    trl = _run(ChunkedLogProbFunction, h, w, targets, outputs=outputs)
    assert ours["mean_logits"] is not None
    for key in ("logprobs", "mean_logits", "grad_hidden", "grad_weight"):
        assert torch.equal(ours[key], trl[key]), key


def test_install_routes_trls_head_and_back():
    import trl.trainer.utils as trl_utils

    try:
        assert lm_head_cpu.install(True) and trl_utils._ChunkedLogProbFunction is Dispatch
    finally:
        assert not lm_head_cpu.install(False)
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction


@pytest.mark.parametrize("head", ["smolflow-cpu", "trl"])
def test_scoring_only_labelled_positions_gives_the_same_loss_and_gradients(monkeypatch, tiny_model_dir, head):
    """TRL's fused LM head (the Trainer's forward) on a batch with prompt tokens masked (-100, as
    assistant-only or completion-only loss masks them): scoring only the labelled positions gives the
    loss and gradients of scoring every position, on fewer rows; an all-masked batch a zero gradient."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # both restored after
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", trl_utils._ChunkedLogProbFunction)
    lm_head_cpu.install(head == "smolflow-cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trl_utils.add_fused_lm_head(model)
    rows = []
    real_apply = trl_utils._ChunkedLogProbFunction.apply

    def counted(hidden, *args, **kwargs):
        rows.append(hidden.shape[0])
        return real_apply(hidden, *args, **kwargs)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counted)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=g)
    labels = ids.clone()
    labels[0, :25], labels[1, :10] = -100, -100  # prompts: once shifted, 15 + 30 positions labelled

    def step(labels):
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert not lm_head_cpu.score_labelled_only(False)
    every, every_grads = step(labels)
    assert lm_head_cpu.score_labelled_only(True)
    labelled, labelled_grads = step(labels)
    assert rows == [2 * 39, 45]
    torch.testing.assert_close(labelled, every, rtol=1e-6, atol=1e-6)
    for name, grad in every_grads.items():
        torch.testing.assert_close(labelled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    _, none_grads = step(torch.full_like(labels, -100))
    assert rows[-1] == 0 and all(torch.count_nonzero(grad) == 0 for grad in none_grads.values())
    assert not lm_head_cpu.score_labelled_only(False) and trl_utils._use_triton is not lm_head_cpu._labelled_only_on_cpu
