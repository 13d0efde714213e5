"""Training options (LoRA, scheduler, weight decay, optimizer, sft_args) and the hub push: bad
settings named before any compute; good ones reach the Trainer."""

import pytest

from tasks.checks import ConfigError, check_run
from tasks.config import RunConfig, TrainingConfig
from tasks.storage import ArtifactStore
from tasks.training import train_sft
from tests.conftest import tokens_of


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"training": {"sft_args": {"max_grad_norme": 0.5}}},
         "training.sft_args.max_grad_norme: TRL's SFTConfig has no field 'max_grad_norme' (did you mean max_grad_norm?)"),
        ({"training": {"sft_args": {"learning_rate": 0.1}}}, "use training.learning_rate instead"),
        ({"training": {"sft_args": {"warmup_steps": 3}}}, "use training.warmup_ratio instead"),
        ({"training": {"sft_args": {"hub_token": "x"}}}, "training.sft_args.hub_token"),
        # "no" would silently drop the checkpoints (resume), the eval loss, the loss curve the health check reads
        ({"training": {"sft_args": {"save_strategy": "no"}}},
         "training.sft_args.save_strategy: smolflow sets this SFTConfig field itself; use training.save_steps"),
        ({"training": {"sft_args": {"eval_strategy": "no"}}},
         "training.sft_args.eval_strategy: smolflow sets this SFTConfig field itself; use training.eval_steps"),
        ({"training": {"sft_args": {"logging_strategy": "no"}}},
         "training.sft_args.logging_strategy: smolflow sets this SFTConfig field itself; use training.logging_steps"),
        ({"training": {"sft_args": {"max_grad_norm": "big"}}}, "training.sft_args.max_grad_norm: 'big' is not a valid float"),
        # the W&B run is smolflow's, the hub push too: the Trainer would have taken these and done nothing
        ({"training": {"sft_args": {"run_name": "mine"}}}, "training.sft_args.run_name: smolflow sets this SFTConfig "
         "field itself; use output.run_id"),
        ({"training": {"sft_args": {"hub_strategy": "all_checkpoints"}}}, "training.sft_args.hub_strategy: would have "
         "no effect"),
        ({"training": {"sft_args": {"project": "mine"}}}, "training.sft_args.project: would have no effect"),
        ({"training": {"sft_args": {"gradient_checkpointing_kwargs": {"use_reentrant": False}}}},
         "training.sft_args.gradient_checkpointing_kwargs: applies only with checkpointing, which is off"),
        ({"training": {"optim": "adamw_torchh"}}, "training.optim: unknown 'adamw_torchh'"),
        ({"training": {"lr_scheduler_type": "cosinus"}}, "training.lr_scheduler_type: unknown 'cosinus'"),
    ],
)
def test_bad_training_options_are_named_at_validation(patch, message):
    with pytest.raises(ConfigError) as err:
        check_run(RunConfig.model_validate(patch | {"judge": {"enabled": False}}))
    assert message in str(err.value)


def test_sft_args_are_checked_with_the_runs_own_precision():
    # The run's SFTConfig turns bf16 on where execution.precision resolves to bf16, so fp16 beside it
    # is refused by transformers; validation built the trial SFTConfig as fp32 on the CPU and said OK.
    config = RunConfig.model_validate({"execution": {"device": "cpu", "precision": "bf16"},
                                       "training": {"sft_args": {"fp16": True}}, "judge": {"enabled": False}})
    with pytest.raises(ConfigError, match="At most one of fp16 and bf16"):
        check_run(config)


def test_optimizer_and_scheduler_names_read_from_source_are_transformers_enums():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from tasks.checks_training import _enum_values

    assert _enum_values("trainer_utils", "SchedulerType") == [e.value for e in SchedulerType]
    assert _enum_values("training_args", "OptimizerNames") == [e.value for e in OptimizerNames]


def test_push_to_hub_offline_fails_at_validation(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # even with a token: the hub is off
    config = RunConfig.model_validate({"output": {"push_to_hub": "me/smol-tuned"}, "judge": {"enabled": False}})
    with pytest.raises(ConfigError) as err:
        check_run(config)
    assert "output.push_to_hub='me/smol-tuned'" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    assert "hf_not_a_real_token" not in str(err.value)


def test_push_to_hub_needs_a_token(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as on a machine with the hub enabled
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = RunConfig.model_validate({"output": {"push_to_hub": "me/smol-tuned"}, "judge": {"enabled": False}})
    with pytest.raises(ConfigError, match="needs a hub token: set HF_TOKEN"):
        check_run(config)
    with pytest.raises(ConfigError, match="output.hub_token_secret='no-such-block': no such Prefect Secret block"):
        check_run(config.model_copy(update={"output": config.output.model_copy(update={"hub_token_secret": "no-such-block"})}))


def test_a_bad_repo_id_is_named():
    with pytest.raises(ValueError, match="output.push_to_hub"):
        RunConfig.model_validate({"output": {"push_to_hub": "no slash here"}})


def test_the_flow_stops_on_a_bad_sft_arg_before_any_compute(tmp_path):
    from flows.finetune import finetune

    config = RunConfig.model_validate({"output": {"artifacts_uri": str(tmp_path)}, "training": {"sft_args": {"nope": 1}}})
    with pytest.raises(ConfigError, match="training.sft_args.nope"):
        finetune(config=config)
    assert not list(tmp_path.iterdir())  # no run folder: nothing was loaded, trained or written


def test_lora_trains_a_tiny_model_and_the_merged_weights_load(tiny_ref, fixture_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_uri = str(tmp_path / "runs" / "lora")
    cfg = TrainingConfig(
        max_steps=2, logging_steps=1, eval_steps=2, save_steps=2, max_length=128, learning_rate=0.01,
        lr_scheduler_type="cosine", weight_decay=0.05, optim="adamw_torch",
        peft={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        sft_args={"max_grad_norm": 0.5},
    )
    result = train_sft.fn(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, run_uri, [])
    # Only the adapters trained: q/v of 2 layers at rank 4 (64 -> 64 and 64 -> 32 projections).
    assert result.metrics["trainable_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    args = result.trainer_args
    assert (args["lr_scheduler_type"], args["weight_decay"], args["optim"], args["max_grad_norm"]) == (
        "cosine", 0.05, "adamw_torch", 0.5)

    model_dir = tmp_path / "runs" / "lora" / "model"
    assert not (model_dir / "adapter_config.json").exists()  # merged: a plain model, no adapters
    tuned = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_ref.path)
    assert not any("lora" in name for name in tuned.state_dict())
    changed = {n for n, w in tuned.state_dict().items() if not torch.equal(w, base.state_dict()[n])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("q", "v")}
    assert "model/model.safetensors" in ArtifactStore(run_uri).list_files()

