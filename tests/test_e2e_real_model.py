"""End to end on the real SmolLM2-135M-Instruct (the built-in offline model): a few steps."""

import math

import pytest

from flows.finetune import finetune
from tasks.models import BUILTIN
from tests.conftest import tiny_run_config
from tests.test_flow import check_run_folder


@pytest.mark.slow
def test_real_smollm2_fine_tunes_and_is_scored(builtin_dir, tmp_path):
    config = tiny_run_config(
        "auto",  # offline: resolves to the built-in SmolLM2-135M-Instruct
        str(tmp_path / "artifacts"),
        training={"max_steps": 2, "eval_steps": 2, "per_device_train_batch_size": 2, "max_length": 384},
        sampling={"prompts": ["Hello! How are you?"], "max_new_tokens": 24},
    )
    summary = finetune(config=config)
    manifest = check_run_folder(summary["run"])
    assert manifest["base_model"]["source"] == "auto"
    assert manifest["base_model"]["path"] == str(builtin_dir)
    assert manifest["tuned_model"]["fingerprint"] != manifest["base_model"]["fingerprint"]
    # A pretrained 135M chat model already models everyday conversations well; random init
    # would sit near ln(49152) = 10.8.
    assert math.isfinite(summary["training"]["eval_loss"]) and summary["training"]["eval_loss"] < 4.0
    assert summary["benchmarks"][0]["n"] == 2
    assert manifest["resolved"]["model"] == BUILTIN  # what `auto` meant offline, recorded
    # and what the tuned model came from, by that name: "tuned from auto" says nothing a month on
    assert manifest["tuned_model"]["source"] == f"tuned from {BUILTIN}", manifest["tuned_model"]
