"""Training with TRL's SFTTrainer and scoring with lm-eval, on a tiny real model."""

import math

import pytest

from tasks.config import BenchmarkConfig, TrainingConfig
from tasks.evaluation import run_benchmark
from tasks.models import fingerprint_dir
from tasks.storage import ArtifactStore
from tasks.training import train_sft
from tests.conftest import tokens_of


@pytest.mark.slow
def test_sft_trains_evaluates_and_saves_to_the_run_folder(tiny_ref, fixture_data, tmp_path):
    run_uri = str(tmp_path / "runs" / "t1")
    cfg = TrainingConfig(max_steps=3, logging_steps=1, eval_steps=2, save_steps=2, max_length=256)
    result = train_sft.fn(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, run_uri, [])
    assert result.metrics["steps"] == 3
    assert math.isfinite(result.metrics["eval_loss"]) and result.metrics["eval_loss"] > 0
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 3
    assert any("eval_loss" in h for h in result.log_history)
    # The saved model is a loadable transformers model, and its fingerprint is its content's.
    model_dir = tmp_path / "runs" / "t1" / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    assert result.model.fingerprint == fingerprint_dir(model_dir)
    assert result.model.fingerprint != tiny_ref.fingerprint
    assert "model/config.json" in ArtifactStore(run_uri).list_files()


def test_gsm8k_through_lm_eval_records_every_item(tiny_ref):
    result = run_benchmark.fn(tiny_ref, BenchmarkConfig(name="gsm8k", limit=3, batch_size=3))
    assert result.n == 3 and len(result.records) == 3
    assert 0.0 <= result.score <= 1.0
    assert result.settings["num_fewshot"] == 5 and result.settings["apply_chat_template"] is False
    assert "Question:" in result.settings["generation_kwargs"]["until"]
    first = result.records[0]
    assert first["prompt"].count("Question:") == 6  # 5 shots + the item itself
    assert "####" in first["gold"]
    assert first["correct"] == (first["extracted"] == first["gold"].split("#### ")[-1])
