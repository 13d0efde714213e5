"""Padding-free batches (smolflow's default) train exactly like the seed's padded ones, cheaper."""

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from tasks.config import TrainingConfig
from tasks.training import prepare_splits, train_sft
from tests.conftest import tokens_of


@pytest.mark.slow
def test_padding_free_gives_the_padded_losses(tiny_ref, fixture_data, tmp_path):
    losses = {}
    for padding_free in (True, False):
        cfg = TrainingConfig(max_steps=3, logging_steps=1, eval_steps=3, save_steps=100, max_length=256,
                             padding_free=padding_free)
        result = train_sft.fn(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, str(tmp_path / "runs" / f"pf-{padding_free}"), [])
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
