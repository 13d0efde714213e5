"""Shared-prefix KV reuse (tasks/benchmarks/fast_lm.py) gives lm-eval's HF backend's per-item results.

Each test scores the same items through the stock lm-eval task YAMLs with `HFLM` and with
`SharedPrefixLM` and compares item by item: generated text exactly, log-likelihoods within float
rounding and the same pick per item.
"""

import json
from pathlib import Path

import pytest
import torch

from tasks.benchmarks import REGISTRY, fast_lm
from tasks.benchmarks.fast_lm import ENGINE, SharedPrefixLM
from tasks.benchmarks.mmlu import MMLU
from tasks.benchmarks.prefixes import (
    GROUP_COST,
    masked_sdpa,
    prefix_groups,
    prompt_batches,
    scoring_passes,
    segment_attention,
    shared_prefix_attention,
)
from tasks.config import BenchmarkConfig
from tasks.runtime import FIXTURES


@pytest.fixture(scope="session")
def prefect_server():
    """These tests call lm-eval directly, outside any flow: no Prefect server to start."""
    yield


class FewShotMMLU(MMLU):
    """MMLU cloze with `num_fewshot` applied: MMLU's task configs pin num_fewshot: 0, which makes
    lm-eval ignore the requested shots."""

    def task_configs(self, cfg, workdir):
        return [spec | {"num_fewshot": cfg.num_fewshot or 0} for spec in super().task_configs(cfg, workdir)]


class LetteredMMLU(FewShotMMLU):
    """lm-eval's stock `mmlu/default` ("A. ... D." then " A".." D"), on the same local data."""

    stock_yaml = "mmlu/default/mmlu_{subset}.yaml"
    metric = "acc,none"


def _both(model_dir: Path, bench, cfg: BenchmarkConfig, batch_size: int = 4):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        bench.evaluate_lm(cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu"), cfg)
        for cls in (HFLM, SharedPrefixLM)
    ]


def _same_choices(reference, fast, tolerance: float = 2e-4) -> None:
    """Multiple choice: the same pick per item, each choice's log-likelihood within rounding."""
    assert reference.n == fast.n > 0
    for ref, got in zip(reference.records, fast.records, strict=True):
        assert ref["doc_id"] == got["doc_id"] and ref["extracted"] == got["extracted"]
        assert ref["correct"] == got["correct"]
        assert ref["output"].keys() == got["output"].keys()
        for choice, ll in ref["output"].items():
            assert got["output"][choice] == pytest.approx(ll, abs=tolerance), (ref["doc_id"], choice)
    assert fast.score == reference.score


def _same_text(reference, fast) -> None:
    assert reference.n == fast.n > 0
    assert [r["output"] for r in fast.records] == [r["output"] for r in reference.records]
    assert [r["correct"] for r in fast.records] == [r["correct"] for r in reference.records]


@pytest.fixture(scope="module")
def mmlu_fewshot_dir(tmp_path_factory) -> Path:
    """The MMLU fixture with 3 dev rows per subject (other subjects' questions, relabelled)."""
    folder = tmp_path_factory.mktemp("mmlu")
    test = [json.loads(line) for line in (FIXTURES / "mmlu" / "test.jsonl").read_text().splitlines()]
    subjects = sorted({r["subject"] for r in test})
    dev = [
        r | {"subject": s} for s in subjects for r in [x for x in test if x["subject"] != s][:3]
    ]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    return folder


def test_prefix_groups_share_the_few_shot_block():
    shots = tuple(range(100, 140))
    contexts = [shots + (1, 2), shots + (3,), (7, 8, 9), shots + (1, 5, 6)]
    groups = prefix_groups(contexts)
    assert sorted(groups) == [(0, [(7, 8, 9)]), (40, [shots + (1, 2), shots + (1, 5, 6), shots + (3,)])]
    # Each member keeps a token of its own; a lone context is run whole.
    assert prefix_groups([shots]) == [(0, [shots])]
    assert prefix_groups([]) == []


def test_prefix_groups_share_a_short_header_across_a_subject_and_a_long_passage_within_it():
    """MMLU 0-shot: a subject's questions share only its ~15-token header, and most begin with a
    word no neighbour begins with. They form one group sharing the header (one group per first
    word, or whole questions in one-row passes, cost more), while three questions on one long
    passage share it in a group of their own."""
    header = {s: (s, *range(200, 214)) for s in (1, 2)}  # two subjects' 15-token headers, differing at the first token
    questions = [(1000 + q, *range(3000 + 40 * q, 3000 + 40 * q + 60)) for q in range(20)]  # no two start alike
    passage = tuple(range(5000, 5300))
    on_passage = [passage + (6000 + q, 6001 + q) for q in range(3)]
    contexts = [header[s] + q for s in (1, 2) for q in questions] + [header[1] + p for p in on_passage]
    groups = sorted(prefix_groups(contexts), key=lambda g: -len(g[1]))
    assert [(shared, len(members)) for shared, members in groups] == [(15, 20), (15, 20), (315, 3)]
    assert {m[:15] for m in groups[0][1]} == {header[1]} and sorted(groups[2][1]) == sorted(header[1] + p for p in on_passage)
    # Two questions sharing a few tokens beyond the header: not worth a group (GROUP_COST) of their own.
    pair = [header[1] + (9000, 9001, 9002, q) for q in (1, 2)]
    assert [(s, len(m)) for s, m in prefix_groups([header[1] + q for q in questions] + pair)] == [(15, 22)]
    # What nothing is shared by fills one group (shared 0), not a one-row pass each.
    assert [(s, len(m)) for s, m in prefix_groups(questions)] == [(0, 20)]
    assert GROUP_COST > 3


def test_generation_batches_never_mix_two_few_shot_blocks():
    a, b = "Task A examples. " * 20, "Task B examples. " * 20
    prompts = [a + "q1", b + "q1", a + "q2", a + "q3", b + "q2", "Q: x", "Q: y"]
    # Sorted; the A block and the B block each get batches of their own though the size allows more;
    # prompts that share no block still fill a batch (a lone prompt always takes the next one).
    assert prompt_batches(prompts, 8) == [[5, 6], [0, 2, 3], [1, 4]]
    # At 2 per batch, A's last prompt and B's first share nothing: they go with the other loose
    # ones (by length, longest first), before the batches that share a block.
    assert prompt_batches(prompts, 2) == [[3, 1], [5, 6], [0, 2], [4]]


def test_prompts_sharing_nothing_are_batched_by_length():
    # GSM8K: every item draws its own shots, so text order buys nothing; length order keeps each
    # batch's rows close in length (little padding), longest first as HFLM does.
    prompts = ["b" * 50, "a" * 300, "c" * 120, "d" * 310, "e" * 45, "f" * 130]
    assert prompt_batches(prompts, 2) == [[3, 1], [5, 2], [0, 4]]


def test_shared_prefix_attention_equals_attention_over_the_whole_cache():
    """The prefix's keys stored once for every row give what SDPA gives over each row's full copy:
    grouped-query heads, left-padded own tokens, several query positions and one (a decode step)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    rows, heads, kv_heads, dim, prefix, own = 3, 6, 2, 8, 5, 4
    module = SimpleNamespace(layer_idx=1, num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    shared_kv = [None, (torch.randn(kv_heads, prefix, dim), torch.randn(kv_heads, prefix, dim))]
    key, value = torch.randn(rows, kv_heads, own, dim), torch.randn(rows, kv_heads, own, dim)
    real = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)  # left pads
    full_k = torch.cat([shared_kv[1][0].expand(rows, -1, -1, -1), key], dim=2)
    full_v = torch.cat([shared_kv[1][1].expand(rows, -1, -1, -1), value], dim=2)
    for q in (own, 1):  # the rows' own tokens at once, then one new token each
        query = torch.randn(rows, heads, q, dim)
        allowed = torch.ones(q, own, dtype=torch.bool).tril(own - q) & real[:, None, :]  # query i sits at own-q+i
        if q == own:
            allowed |= torch.eye(own, dtype=torch.bool)  # a pad sees itself, as in _generate_batch
        allowed = allowed[:, None]  # (rows, 1, q, own)
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        got, _ = shared_prefix_attention(module, query, key, value, additive, scaling=dim**-0.5, shared_kv=shared_kv)
        whole = torch.cat([torch.ones(rows, 1, q, prefix, dtype=torch.bool), allowed], dim=-1)
        want, _ = sdpa_attention_forward(module, query, full_k, full_v, whole, scaling=dim**-0.5)
        assert got.shape == want.shape == (rows, q, heads, dim)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_masked_attention_repeats_kv_heads_where_sdpa_would_not_group_them():
    """CUDA's SDPA takes a mask with grouped kv heads only in its math kernel, so there the heads are
    repeated: both ways give the same attention (checked here on the CPU, which groups them)."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 9, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.zeros(2, 1, 5, 7).masked_fill(torch.rand(2, 1, 5, 7) < 0.3, torch.finfo(torch.float32).min)
    mask[..., 0] = 0  # every query sees a key
    grouped = masked_sdpa(query, key, value, mask, 0.35)
    torch.testing.assert_close(masked_sdpa(query, key, value, mask, 0.35, grouped=False), grouped)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask, scale=0.35)
    torch.testing.assert_close(grouped, want)


@pytest.mark.parametrize("prefill_tokens", [4096, 1])
def test_gsm8k_generation_equals_hflm(tiny_model_dir, monkeypatch, prefill_tokens):
    # Batch 4 over 5 items: a partial batch, suffixes of unequal length after the 5-shot block.
    # Prefill in one pass, or one row at a time with the rows' caches merged, left-padded.
    monkeypatch.setattr(fast_lm, "PREFILL_TOKENS", prefill_tokens)
    reference, fast = _both(tiny_model_dir, REGISTRY["gsm8k"], BenchmarkConfig(name="gsm8k", limit=5))
    _same_text(reference, fast)


def test_bbh_generation_equals_hflm(tiny_model_dir, monkeypatch):
    shared = []  # the length of each few-shot block computed once for a batch (shared_prefix_attention)
    original = SharedPrefixLM._shared_kv
    monkeypatch.setattr(SharedPrefixLM, "_shared_kv", lambda self, tokens: shared.append(len(tokens)) or original(self, tokens))
    monkeypatch.setattr(fast_lm, "PREFILL_TOKENS", 1)  # each row's own tokens alone, caches merged
    cfg = BenchmarkConfig(name="bbh", limit=5, subsets=["boolean_expressions", "web_of_lies"])
    reference, fast = _both(tiny_model_dir, REGISTRY["bbh"], cfg, batch_size=2)
    _same_text(reference, fast)
    assert len(reference.records) == 9  # 5 + 4: three batches of one task, two of the other
    # Each task's 3-shot block computed once, though its items span several batches.
    assert len(shared) == 2 and min(shared) > 50, shared


def test_segment_attention_refuses_to_run_without_its_segments():
    """A model whose layers drop the forward's keyword arguments would let packed items attend to
    each other: that must fail loudly, not score wrong."""
    q = k = v = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="keyword arguments"):
        segment_attention(torch.nn.Linear(1, 1), q, k, v, None, scaling=1.0)
    # With them, one item of 3 tokens after a 1-token prefix: each query sees the prefix and itself.
    k = torch.randn(1, 1, 4, 8)
    q, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 4, 8)
    mask = torch.zeros(1, 1, 3, 4).masked_fill(~torch.ones(3, 4, dtype=torch.bool).tril(1), float("-inf"))
    out, _ = segment_attention(None, q, k, v, None, scaling=0.5, segments=[(0, 3, mask)])
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)


def test_scoring_passes_hold_what_their_rows_would():
    lengths = [400, 300, 250, 200, 190, 180, 170, 120, 110, 100, 90, 60, 50, 40, 30, 20]
    passes = scoring_passes(lengths, 4)
    assert passes[0] == [0, 1, 2, 3, 4, 5]  # 1,520 tokens of a 4 x 400 budget; 170 more would pass it
    assert [k for chunk in passes for k in chunk] == list(range(len(lengths)))  # each once, in order
    assert all(sum(lengths[k] for k in chunk) <= 4 * lengths[chunk[0]] for chunk in passes)
    assert scoring_passes([130, 129, 128], 2) == [[0, 1], [2]]


@pytest.mark.parametrize("shots", [0, 3])
def test_mmlu_cloze_and_lettered_equal_hflm(tiny_model_dir, mmlu_fewshot_dir, shots):
    for bench in (FewShotMMLU(), LetteredMMLU()):
        cfg = BenchmarkConfig(name="mmlu", limit=2, num_fewshot=shots, data=str(mmlu_fewshot_dir))
        reference, fast = _both(tiny_model_dir, bench, cfg)
        assert reference.records[0]["prompt"].count("Answer:") == shots + 1  # the shots are there
        _same_choices(reference, fast)


def test_items_packed_into_one_row_equal_hflm(tiny_model_dir, mmlu_fewshot_dir, tmp_path, monkeypatch):
    """Several questions back to back in one row score as HFLM scores each alone: one long
    question sets a pass's budget, and the short ones behind it share its row."""
    rows = [json.loads(line) for line in (mmlu_fewshot_dir / "test.jsonl").read_text().splitlines()]
    subject = rows[0]["subject"]
    mine = [r for r in rows if r["subject"] == subject]
    long = mine[0] | {"question": " ".join([mine[0]["question"]] * 6)}
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [long, *mine[1:], *mine[1:]]))
    (tmp_path / "dev.jsonl").write_text((mmlu_fewshot_dir / "dev.jsonl").read_text())
    widest = []
    score = SharedPrefixLM._score_packed

    def spy(self, prefix, shared, items):
        widest.append(len(items))
        return score(self, prefix, shared, items)

    monkeypatch.setattr(SharedPrefixLM, "_score_packed", spy)
    for bench in (FewShotMMLU(), LetteredMMLU()):
        cfg = BenchmarkConfig(name="mmlu", limit=8, num_fewshot=0, data=str(tmp_path), subsets=[subject])
        _same_choices(*_both(tiny_model_dir, bench, cfg, batch_size=2))
    assert max(widest) > 1  # some pass held more than one question


def test_off_the_cpu_a_probe_picks_packed_passes_or_hflms_batches(tiny_model_dir, mmlu_fewshot_dir, monkeypatch):
    """On a GPU the packed passes can cost more host time than they save (the H200: 0.4x HFLM's
    speed, docs/performance.md#gpu), so there a probe picks; HFLM's path gives HFLM's exact results."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.benchmarks import scoring_probe

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = fast_lm.engine(model, tokenizer, 4)
    assert lm.scoring_choice == (True, "CPU: packed passes (MMLU 4-17x HFLM's speed on the CPUs measured)")
    # The probe itself, run here on the CPU: both paths over the same MMLU-shaped requests.
    packed_s, hflm_s = scoring_probe.time_scoring(lm, lm._packed_loglikelihood)
    assert packed_s > 0 and hflm_s > 0
    lm._device = torch.device("cuda")  # a device object, no GPU needed; the probe's timings stand in
    for found, packs in (((0.2, 0.5), True), ((0.5, 0.2), False)):
        scoring_probe._found.clear()
        monkeypatch.setattr(scoring_probe, "time_scoring", lambda lm, packed: found)
        assert lm.scoring_choice == (packs, f"cuda probe, 16 MMLU-shaped items: packed passes {found[0] * 1e3:.0f} ms, "
                                            f"HFLM batches {found[1] * 1e3:.0f} ms")
        assert lm.packs_scoring is packs
    scoring_probe._found.clear()
    # HFLM's path when the probe says so: HFLM's results exactly, and recorded with the result.
    packed = []
    monkeypatch.setattr(SharedPrefixLM, "_packed_loglikelihood", lambda self, *a: packed.append(1))  # not reached
    monkeypatch.setattr(SharedPrefixLM, "scoring_choice", property(lambda self: (False, "a probe's pick")))
    cfg = BenchmarkConfig(name="mmlu", limit=2, num_fewshot=0, data=str(mmlu_fewshot_dir))
    reference, fast = _both(tiny_model_dir, FewShotMMLU(), cfg)
    _same_choices(reference, fast, tolerance=0)
    result = REGISTRY["mmlu"].evaluate(model, tokenizer, BenchmarkConfig(name="mmlu", limit=2))
    assert result.settings["scoring_passes"] == "HFLM batches (a probe's pick)" and not packed


def test_benchmarks_run_and_record_the_engine(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import memory

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # While the model runs, glibc keeps freed memory (tasks/memory.py), and only then.
    kept = []
    model.register_forward_pre_hook(lambda module, args: kept.append(memory._depth > 0))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    result = REGISTRY["gsm8k"].evaluate(model, tokenizer, BenchmarkConfig(name="gsm8k", limit=2))
    assert result.settings["backend"].startswith(ENGINE) and result.settings["dtype"] == "float32"
    assert result.n == 2
    on = memory.glibc() is not None
    assert result.settings["freed_memory_kept"] is on and kept and set(kept) == {on}
    assert memory._depth == 0  # glibc's defaults are back
    kept.clear()
    result = REGISTRY["mmlu"].evaluate(model, tokenizer, BenchmarkConfig(name="mmlu", limit=2))  # scoring, not generating
    assert kept and set(kept) == {on}
    assert result.settings["scoring_passes"].startswith("packed, shared prefixes (CPU: ")  # on a CPU


# Real model, greedy generation to the stop string in both engines: ~1-2 min of CPU (574 s wall
# at load average 20 on 2 cores).
@pytest.mark.slow
def test_real_model_equals_hflm(builtin_dir, mmlu_fewshot_dir):
    """The real SmolLM2-135M-Instruct: generation (it stops at "Question:" at different lengths per
    row, so rows leave the batch early) and 3-shot lettered MMLU."""
    torch.manual_seed(0)
    reference, fast = _both(builtin_dir, REGISTRY["gsm8k"], BenchmarkConfig(name="gsm8k", limit=3), batch_size=3)
    _same_text(reference, fast)
    cfg = BenchmarkConfig(name="mmlu", limit=1, num_fewshot=3, data=str(mmlu_fewshot_dir))
    _same_choices(*_both(builtin_dir, LetteredMMLU(), cfg))
