"""The decoding cache with room (tasks/benchmarks/kv_room.py) holds what transformers' DynamicCache holds."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tasks.benchmarks.kv_room import RoomyLayer, leaving, with_room


@pytest.fixture(scope="session")
def prefect_server():
    """No flow here: no Prefect server to start."""
    yield


def _kv(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 3, length, 8), torch.randn(rows, 3, length, 8)


@pytest.mark.parametrize("order", ["leaving", "any"])
def test_a_roomy_layer_holds_what_a_dynamic_layer_holds(order):
    """Every way a cache layer changes (new tokens past the room, rows leaving, beam reordering with
    repeats, repeating rows, cropping, offloading, a reset and a new start) leaves a RoomyLayer with
    the keys and values a DynamicLayer has after the same calls, and its next tokens in the right place."""
    torch.manual_seed(0)
    first = _kv(5, 7)
    plain, roomy = DynamicLayer(), RoomyLayer(*first, room=3)
    plain.update(*first)
    steps = [("add", 1), ("add", 1), ("drop", [0, 3]), ("add", 1), ("add", 2), ("drop", [2]),  # grows past its room
             ("add", 1), ("reorder", [1, 1, 0]), ("add", 1), ("repeat", 2), ("add", 1), ("crop", -3), ("add", 2),
             ("offload", None), ("prefetch", None), ("add", 1), ("reset", None), ("add", 4), ("add", 1)]
    rows, lengths = 5, 7
    for what, arg in steps:
        if what == "add":
            new = _kv(rows, arg)
            plain.update(*new), roomy.update(*new)
        elif what == "drop":
            keep = [s for s in range(rows) if s not in arg]
            keep = leaving(keep, rows) if order == "leaving" else keep[::-1]
            plain.batch_select_indices(torch.tensor(keep))
            roomy.batch_select_indices(torch.tensor(keep))
            rows = len(keep)
        elif what == "reorder":
            plain.reorder_cache(torch.tensor(arg)), roomy.reorder_cache(torch.tensor(arg))
            rows = len(arg)
        elif what == "repeat":
            plain.batch_repeat_interleave(arg), roomy.batch_repeat_interleave(arg)
            rows *= arg
        else:
            getattr(plain, what)(*([] if arg is None else [arg]))
            getattr(roomy, what)(*([] if arg is None else [arg]))
        lengths = 0 if what == "reset" else lengths + arg if what in ("add", "crop") else lengths
        if what == "reset":
            assert not roomy.is_initialized and roomy.keys is None and roomy.get_seq_length() == 0
            continue
        for a, b in zip((plain.keys, plain.values), (roomy.keys, roomy.values), strict=True):
            assert torch.equal(a, b), (what, arg)
        assert roomy.get_seq_length() == plain.get_seq_length() == lengths
        assert roomy.get_mask_sizes(1) == plain.get_mask_sizes(1)
    with pytest.raises(ValueError):  # as DynamicLayer: the legacy positive crop is refused
        roomy.crop(2)


def test_only_full_attention_layers_get_room():
    """A sliding-window layer drops old tokens as it grows: it keeps its own rules (and an empty
    layer has nothing to copy yet)."""
    cache = DynamicCache()
    cache.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4), DynamicLayer()]
    for layer in cache.layers[:2]:
        layer.update(*_kv(2, 6))
    kinds = [type(layer) for layer in with_room(cache, 8).layers]
    assert kinds == [RoomyLayer, DynamicSlidingWindowLayer, DynamicLayer]


def test_rows_that_stay_keep_their_slot_and_the_tail_fills_the_holes():
    assert leaving([0, 1, 2], 3) == [0, 1, 2]
    assert leaving([1, 2], 3) == [2, 1]
    assert leaving([0, 2, 4, 5], 6) == [0, 4, 2, 5]
    assert leaving([5], 6) == [5]
    for keep in ([0, 2, 3, 7], [1, 4, 5, 6, 7], [6, 7]):
        order = leaving(keep, 8)
        assert sorted(order) == keep
        assert all(order[s] == s for s in keep if s < len(keep))


@pytest.mark.parametrize("room", [256, 4])
def test_rows_leaving_at_different_steps_get_the_tokens_they_get_without_stopping(builtin_dir, monkeypatch, room):
    """Rows stop at different steps (each at a token of its own made an EOS id) and leave the batch
    from different slots; every row's tokens are its unstopped tokens cut after its first EOS id.
    With room for 4 tokens the cache also grows twice while rows decode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.benchmarks import fast_lm
    from tasks.benchmarks.fast_lm import engine

    monkeypatch.setattr(fast_lm, "ROOM", room)

    # The real model: a random tiny one repeats one token per row, so no row would stop on its own token.
    model = AutoModelForCausalLM.from_pretrained(builtin_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(builtin_dir)
    prompts = ["The cat sat on", "One two three four five", "Hello", "A much longer prompt about the weather today"]
    rows = [tokenizer.encode(p) for p in prompts]
    lm = engine(model, tokenizer, batch_size=4)
    full = lm.greedy(prompts, rows, [], 12, eos_ids={-1})
    assert all(len(f) == 12 for f in full)
    eos = {full[0][2], full[2][5], full[3][8]}  # rows 0, 2, 3 stop early (the others may too)
    cut = [f[: next((i + 1 for i, t in enumerate(f) if t in eos), len(f))] for f in full]
    assert len({len(c) for c in cut}) >= 3, cut  # at least three different stopping steps
    assert lm.greedy(prompts, rows, [], 12, eos_ids=eos) == cut
