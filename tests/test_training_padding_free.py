"""Padding-free batches (smolflow's default) train exactly like the seed's padded ones, cheaper."""

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from tasks.config import TrainingConfig
from tasks.packed_attention import PACKED
from tasks.training import prepare_splits, train_sft
from tests.conftest import tokens_of


@pytest.mark.slow
def test_padding_free_gives_the_padded_losses(tiny_ref, fixture_data, tmp_path):
    losses = {}
    for padding_free in (True, False):
        cfg = TrainingConfig(max_steps=3, logging_steps=1, eval_steps=3, save_steps=100, max_length=256,
                             padding_free=padding_free)
        result = train_sft.fn(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, str(tmp_path / "runs" / f"pf-{padding_free}"), [])
        # Padding-free rows train with per-sequence attention (the padded ones with SDPA), recorded with the run.
        assert result.trainer_args["smolflow_levers"]["attention"] == (PACKED if padding_free else "sdpa")
        assert result.trainer_args["smolflow_levers"]["freed_memory_kept"] is True  # glibc, CPU: kept while training
        # TRL's own max_length is off with padding-free batches; the record says where the rows were cut
        assert result.trainer_args["max_length"] == (None if padding_free else 256)
        assert result.trainer_args["smolflow_rows_cut_to"] == 256
        losses[padding_free] = [h["loss"] for h in result.log_history if "loss" in h] + [result.metrics["eval_loss"]]
    assert len(losses[True]) == 4
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) < 1e-3 * b, losses  # same tokens, same labels, attention kept per conversation


def test_padding_free_rows_are_cut_to_max_length(tiny_model_dir, fixture_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    splits = load_from_disk(fixture_data.path)
    train, test = prepare_splits(splits, tokenizer, TrainingConfig(max_length=64, padding_free=True))
    assert len(train) == len(splits["train"]) and len(test) == len(splits["test"])
    lengths = [len(ids) for ids in train["input_ids"]]
    assert max(lengths) == 64  # fixture conversations are 109-175 tokens
    full = tokenizer.apply_chat_template(splits["train"][0]["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert train[0]["input_ids"] == full[:64]


def _packed_batch(model, lengths, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions


def test_packed_attention_equals_the_block_diagonal_mask(tiny_model_dir):
    """Per-sequence causal SDPA (what padding-free training uses) gives transformers' packed-mask logits and grads."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.packed_attention import PACKED

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lengths = [7, 12, 5, 9]
    ids, positions = _packed_batch(model, lengths)
    out = {}
    for name in ("sdpa", PACKED):
        model.config._attn_implementation = name
        model.zero_grad()
        result = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
        result.loss.backward()
        out[name] = (result.logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    (logits_sdpa, grad_sdpa), (logits_packed, grad_packed) = out["sdpa"], out[PACKED]
    assert torch.allclose(logits_sdpa, logits_packed, atol=1e-5)
    assert torch.allclose(grad_sdpa, grad_packed, atol=1e-6, rtol=1e-4)
    # Each sequence is computed as if alone: the third sequence's logits equal its own forward pass.
    start = sum(lengths[:2])
    with torch.no_grad():
        alone = model(input_ids=ids[:, start : start + lengths[2]], use_cache=False).logits
    assert torch.allclose(logits_packed[:, start : start + lengths[2]], alone, atol=1e-5)


def test_packed_attention_leaves_padded_batches_to_sdpa(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.packed_attention import PACKED

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(5, model.config.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row: needs the mask, not per-sequence attention
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        model.config._attn_implementation = PACKED
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(expected[mask.bool()], got[mask.bool()])


def test_lm_head_chunk_gives_trls_results_and_is_decided_by_the_probe():
    """TRL's fused LM head at the CPU chunk gives its default chunk's log-probs and gradients."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from tasks.train_levers import CPU_CHUNK, TRL_CHUNK, HeadProbe

    g = torch.Generator().manual_seed(0)
    vocab, hidden, tokens = 3 * CPU_CHUNK + 100, 64, 40  # several chunks, the last one partial
    h0, w0 = torch.randn(tokens, hidden, generator=g), 0.05 * torch.randn(vocab, hidden, generator=g)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    out = {}
    for chunk in (TRL_CHUNK, CPU_CHUNK):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        logprobs, entropy, *_ = ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, chunk, None, 1.0, ("entropy",))
        logprobs.sum().backward()
        out[chunk] = (logprobs.detach(), entropy, h.grad, w.grad)
    for a, b in zip(out[TRL_CHUNK], out[CPU_CHUNK]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert HeadProbe(trl_s=1.0, cpu_s=0.5, smolflow_s=1.0).chunk == CPU_CHUNK
    assert HeadProbe(trl_s=1.0, cpu_s=0.95, smolflow_s=1.0).chunk == TRL_CHUNK  # within the 10% margin: TRL's stays
    assert HeadProbe(trl_s=1.0, cpu_s=0.5, smolflow_s=0.4).ours
    assert not HeadProbe(trl_s=1.0, cpu_s=0.5, smolflow_s=0.46).ours  # within 10% of TRL's best: TRL's


def test_levers_set_and_record_trls_chunk(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from tasks import train_levers

    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", train_levers.TRL_CHUNK)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", trl_utils._ChunkedLogProbFunction)  # restored after
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    train_levers.head_probe.cache_clear()
    from trl.kernels import ChunkedLogProbFunction

    from tasks import lm_head_cpu
    from tasks.lm_head_cpu import Dispatch

    timings = {"trl_s": 1.0, "cpu_s": 0.4, "smolflow_s": 0.3, "bf16_s": 0.004, "fp32_s": 0.002}
    monkeypatch.setattr(train_levers, "race", lambda candidates, rounds, warmup=True: {name: timings[name] for name in candidates})
    levers = train_levers.apply(model, padding_free=True, device="cpu", bf16=False)
    assert levers["attention"] == PACKED and levers["lm_head_vocab_chunk"] == train_levers.CPU_CHUNK
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == train_levers.CPU_CHUNK
    assert levers["lm_head"] == "smolflow-cpu" and trl_utils._ChunkedLogProbFunction is Dispatch
    assert "0.30 s smolflow's; TRL's 0.40 s at 4096" in levers["lm_head_reason"]
    assert levers["lm_head_scores"] == "labelled" and trl_utils._use_triton is lm_head_cpu._labelled_only_on_cpu
    # bf16 autocast: attention in fp32 where the probe finds SDPA faster in fp32 (cached per machine)
    from tasks import packed_attention

    train_levers.attention_probe.cache_clear()
    levers = train_levers.apply(model, padding_free=True, device="cpu", bf16=True)
    assert levers["attention_fp32_under_bf16"] is True and packed_attention.UPCAST
    assert "2.00 ms in fp32 vs 4.00 ms in bf16" in levers["attention_reason"]
    levers = train_levers.apply(model, padding_free=True, device="cpu", bf16=False)
    assert not packed_attention.UPCAST and "attention_fp32_under_bf16" not in levers
    train_levers.attention_probe.cache_clear()
    # On a GPU a probe picks the attention for packed rows (no GPU here: its result stands in), and the reason says so
    probes = {True: train_levers.PackingProbe(per_sequence_s=0.012, block_mask_s=0.0013),  # the H200's cuDNN
              False: train_levers.PackingProbe(per_sequence_s=0.001, block_mask_s=0.002)}
    for faster_masked in (False, True):
        monkeypatch.setattr(train_levers, "packing_probe", lambda device, bf16: probes[faster_masked])
        levers = train_levers.apply(model, padding_free=True, device="cuda", bf16=False)  # Triton's tuning: untouched
        assert levers["attention"] == ("sdpa" if faster_masked else PACKED) == model.config._attn_implementation
        assert levers["attention_reason"].startswith("cuda probe: SDPA fwd+bwd over 4 packed sequences")
    assert "12.00 ms one call per sequence vs 1.30 ms over the block mask" in levers["attention_reason"]
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == train_levers.TRL_CHUNK == levers["lm_head_vocab_chunk"]
    assert levers["lm_head"] == "trl" and trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert levers["lm_head_scores"] == "every" and trl_utils._use_triton is not lm_head_cpu._labelled_only_on_cpu
    assert levers["freed_memory_kept"] is False  # a GPU run's host memory is not the step's
    train_levers.head_probe.cache_clear()
    assert train_levers.apply(model, padding_free=True, device="cpu", bf16=False, enabled=False)["freed_memory_kept"] is False


def test_the_packing_probe_times_both_attentions_on_new_lengths_each_pass(monkeypatch):
    """The probe a GPU run makes, run here on the CPU: both ways over the same packed rows, every pass
    with lengths not seen before (a kernel library's per-shape planning is what it must catch)."""
    import torch

    from tasks import packed_attention

    seen = []
    lengths = packed_attention._lengths

    def spy(position_ids):
        seen.append(tuple(lengths(position_ids)))
        return seen[-1]

    monkeypatch.setattr(packed_attention, "_lengths", spy)
    per_sequence, block_mask = packed_attention.time_packing("cpu", torch.float32, reps=3)
    assert per_sequence > 0 and block_mask > 0
    assert len(seen) == 4 and len(set(seen)) == 4 and all(len(s) == 4 for s in seen)  # 4 sequences, new each pass


def _rss_mb() -> float:
    """This process's resident memory in MB."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _faults_to_fill(mb: int) -> int:
    """Minor page faults taken to allocate, write and free `mb` MB, as a training step's big tensors are."""
    import resource

    import torch

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(mb * 2**18).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del block
    return faults


def _heap_mb() -> float:
    """The size of this process's brk heap in MB: no free hole in it can be bigger."""
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                return (end - start) / 2**20
    return 0.0


def test_freed_memory_is_kept_while_training_and_returned_after():
    """Inside the lever a freed block stays in the process and is reused without page faults; with
    glibc's defaults a block this big is unmapped when freed (and paged in afresh next time); the
    periodic trim and the end of training give the kept pages back."""
    from tasks import train_levers

    libc = train_levers.glibc()
    if libc is None:
        pytest.skip("not glibc: the lever is off and recorded as off")
    import gc

    from transformers import TrainerCallback  # noqa: F401  (trim_callback imports it: not between two readings)

    # Garbage left by earlier tests in this worker (a model in a reference cycle) is freed now, not
    # by a collection that happens to run between two readings of the resident memory.
    gc.collect()
    gc.disable()
    try:
        _check_freed_memory_lever(libc, train_levers)
    finally:
        gc.enable()


def test_freed_memory_over_2_gib_is_kept_too():
    """A heap past 1 GiB (a long-lived worker's) makes the kept block over 2 GiB: the lever must not
    trim it either (an M_TRIM_THRESHOLD of 2**31 - 1 did; -1 turns trimming off). In a fresh process,
    so the heap is grown here on purpose."""
    import subprocess
    import sys

    code = (
        "import ctypes, gc\n"
        "from tasks import train_levers\n"
        "from tests import test_training_padding_free as t\n"
        "libc = train_levers.glibc()\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "blocks = [libc.malloc(100 * 1024) for _ in range(12000)]  # under the mmap threshold: brk heap\n"
        "for b in blocks[:-1]:\n"
        "    libc.free(b)  # the last one pins the heap's size\n"
        "assert t._heap_mb() > 1100, t._heap_mb()\n"
        "from transformers import TrainerCallback\n"
        "gc.collect(); gc.disable()\n"
        "t._check_freed_memory_lever(libc, train_levers)\n"
    )
    from tasks import train_levers

    if train_levers.glibc() is None:
        pytest.skip("not glibc: the lever is off and recorded as off")
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]


def _check_freed_memory_lever(libc, train_levers) -> None:
    """The readings of test_freed_memory_is_kept_while_training_and_returned_after, garbage collection off."""
    from types import SimpleNamespace

    # Earlier tests in this worker leave free holes in the heap (some paged out by trims). Blocks
    # bigger than the whole heap never land in one, so every fill below takes the path under test.
    libc.malloc_trim(0)
    before = _rss_mb()
    big = int(_heap_mb()) + 400  # each fill is ~0.1 s of page faults per 100 MB: kept small
    _faults_to_fill(big)  # glibc's defaults: mapped, and unmapped when freed
    assert _rss_mb() < before + 100
    with train_levers.freed_memory_kept(True):
        _faults_to_fill(big)
        assert _rss_mb() > before + big - 100  # kept
        # Reused without page faults (a block a little smaller: an aligned block of the same size
        # asks for a few bytes more than the freed one has, so glibc may take fresh memory for it).
        assert _faults_to_fill(big - 200) < big * 2**20 // 4096 // 20
        trim = train_levers.trim_callback(True, every=50)
        trim.on_step_end(None, SimpleNamespace(global_step=49), None)
        assert _rss_mb() > before + big - 100  # not a trim step
        trim.on_step_end(None, SimpleNamespace(global_step=50), None)
        trimmed = _rss_mb()
        assert trimmed < before + 100  # a trim step: the free pages went back
        _faults_to_fill(big)
        assert _rss_mb() > trimmed + big - 100  # and what is freed after a trim is kept again
    assert _rss_mb() < before + 100  # trimmed when training ends
    with train_levers.freed_memory_kept(True):
        with train_levers.freed_memory_kept(True):  # nested (the scoring engine inside training): a no-op
            pass
        _faults_to_fill(big)
        assert _rss_mb() > before + big - 100  # still kept: the outer one restores glibc's settings
    assert _rss_mb() < before + 100
    _faults_to_fill(int(_heap_mb()) + 200)  # bigger than the heap: inside the lever it would stay
    assert _rss_mb() < before + 100  # glibc's defaults are back
    with train_levers.freed_memory_kept(False):  # off: nothing changes
        _faults_to_fill(int(_heap_mb()) + 200)
        assert _rss_mb() < before + 100
    assert train_levers.trim_callback(False) is None


def test_packed_attention_in_fp32_under_bf16_autocast(tiny_model_dir, monkeypatch):
    """With the upcast lever, bf16 autocast attends in fp32: closer to the fp32 model than bf16 SDPA is."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks import packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids, positions = _packed_batch(model, [9, 14, 6])
    with torch.no_grad():
        reference = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        model.config._attn_implementation = packed_attention.PACKED
        errors = {}
        for upcast in (False, True):
            monkeypatch.setattr(packed_attention, "UPCAST", upcast)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            errors[upcast] = (logits.float() - reference).abs().mean().item()
    assert errors[True] < errors[False], errors
