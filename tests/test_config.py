"""The run configuration: defaults that run offline, bad values named before any compute."""

import time

import pytest
from pydantic import ValidationError

from tasks.config import RunConfig
from flows.finetune import finetune
from tasks.config_args import parse_config


def test_defaults_are_valid_and_offline_ready():
    cfg = RunConfig()
    assert cfg.model == "auto" and cfg.data.dataset == "auto"
    assert cfg.training.max_steps > 0 and cfg.training.gradient_checkpointing is False
    assert [b.name for b in cfg.benchmarks] == ["gsm8k"]
    assert cfg.wandb.mode == "auto"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"training": {"learning_rate": -1}}, "training.learning_rate"),
        ({"training": {"per_device_train_batch_size": 0}}, "training.per_device_train_batch_size"),
        ({"training": {"warmup_ratio": 1.5}}, "training.warmup_ratio"),
        ({"training": {"max_steps": 0}}, "max_steps"),
        ({"training": {"max_stepz": 5}}, "training.max_stepz"),
        ({"benchmarks": [{"name": "gsm9k"}]}, "benchmarks.0.name"),
        ({"benchmarks": [{"name": "gsm8k", "limit": 0}]}, "benchmarks.0.limit"),
        ({"output": {"artifacts_uri": "ftp://host/x"}}, "output.artifacts_uri"),
        ({"output": {"run_id": "../escape"}}, "output.run_id"),
        ({"wandb": {"mode": "loud"}}, "wandb.mode"),
        ({"sampling": {"prompts": []}}, "sampling.prompts"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(patch, field):
    with pytest.raises(ValidationError) as err:
        RunConfig.model_validate(patch)
    assert field in str(err.value)


def test_the_flow_rejects_bad_parameters_before_any_compute():
    started = time.perf_counter()
    with pytest.raises(Exception) as err:
        finetune(config={"training": {"learning_rate": "fast"}})
    assert "config.training.learning_rate" in str(err.value)
    # Validation happens before the flow body: no model load, no data, no training.
    assert time.perf_counter() - started < 30


def test_cli_reads_yaml_then_flags_on_top(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  max_steps: 7\n  learning_rate: 0.001\nmodel: /models/x\n")
    cfg = parse_config(["--config", str(path), "--training.learning-rate", "0.0002"])
    assert cfg.training.max_steps == 7
    assert cfg.training.learning_rate == 0.0002
    assert cfg.model == "/models/x"
