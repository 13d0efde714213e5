"""The run configuration: defaults that run offline, bad values named before any compute."""

import json
import re
import time

import pytest
from pydantic import ValidationError

from tasks.config import RunConfig
from flows.finetune import finetune
from tasks.config_args import UserError, locate, parse_config


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
        # W&B refuses these in its run id (UsageError once the run folder had been made)
        ({"output": {"run_id": "exp:1"}}, "output.run_id"),
        ({"wandb": {"mode": "loud"}}, "wandb.mode"),
        ({"sampling": {"prompts": []}}, "sampling.prompts"),
        # a subset named twice was scored twice (its items counted twice in n, score and stderr)
        ({"benchmarks": [{"name": "mmlu", "subsets": ["astronomy", "astronomy"]}]}, "benchmarks.0.subsets"),
        # settings that split benchmarks none of the listed ones can be split by: accepted, did nothing
        ({"execution": {"task_runner": "ray", "shard_size": 2}}, "execution.shard_size"),
        ({"execution": {"task_runner": "ray", "item_shards": 2}, "benchmarks": [{"name": "mmlu"}]}, "execution.item_shards"),
        # W&B refused these once the run had started (UsageError), leaving a run folder without a status
        ({"wandb": {"project": "a/b"}}, "wandb.project"),
        ({"wandb": {"project": " "}}, "wandb.project"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(patch, field):
    with pytest.raises(ValidationError) as err:
        RunConfig.model_validate(patch)
    assert field in str(err.value)


def test_a_whole_config_check_blames_where_its_field_was_set(tmp_path):
    """RunConfig's own checks (training.max_steps, a benchmark listed twice) blamed the first flag
    given, and lost the file's line."""
    with pytest.raises(UserError) as err:
        parse_config(["--wandb.project", "x", "--training.max-steps", "0"])
    assert str(err.value).startswith("flag --training.max-steps: training.max_steps must be positive")
    path = tmp_path / "run.yaml"
    path.write_text("wandb:\n  project: x\ntraining:\n  max_steps: 0\n")
    with pytest.raises(UserError) as err:
        parse_config(["--config", str(path)])
    assert str(err.value).startswith(f"{path}:4: training.max_steps must be positive")
    with pytest.raises(UserError) as err:
        parse_config(["--wandb.project", "x", "--benchmarks", "[{name: gsm8k}, {name: gsm8k}]"])
    assert str(err.value).startswith("flag --benchmarks: benchmarks[1].name: 'gsm8k' is listed twice")


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


def _refused(argv: list[str]) -> str:
    with pytest.raises(UserError) as err:
        parse_config(argv)
    return str(err.value)


def test_true_false_never_becomes_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  max_steps: yes\ngate:\n  tolerance: on\ndata:\n  max_train_rows: true\n")
    message = _refused(["--config", str(path)])
    for where, field in ((2, "training.max_steps"), (4, "gate.tolerance"), (6, "data.max_train_rows")):
        assert f"{path}:{where}: {field}: needs a number, got true" in message
    # A bare flag switches a boolean on; any other setting needs its value.
    assert parse_config(["--gate.allow-incomparable", "--judge.enabled", "false"]).gate.allow_incomparable is True
    assert _refused(["--gate.tolerance"]) == "--gate.tolerance needs a value: --gate.tolerance VALUE (only true/false settings may be given bare)"
    assert "unknown setting" in _refused(["--gate.tolerence"])


def test_null_on_the_command_line_is_none_and_an_empty_value_is_checked(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  peft: {r: 8}\n")
    assert parse_config(["--config", str(path)]).training.peft.r == 8
    cfg = parse_config(["--config", str(path), "--training.peft", "null", "--output.run-id", "~"])
    assert cfg.training.peft is None and cfg.output.run_id is None
    assert "output.run_id: run_id '' must be a non-empty name" in _refused(["--output.run_id", ""])
    assert "judge.limit: Input should be a valid integer" in _refused(["--judge.limit", ""])


def test_odd_files_and_flag_values_are_refused_naming_where(tmp_path):
    path = tmp_path / "run.yaml"
    for text, expected in (("[]\n", "a config file is a mapping of sections"), ("0\n", "got int"),
                           ("# only a comment\n", None)):
        path.write_text(text)
        if expected is None:
            assert parse_config(["--config", str(path)]) == RunConfig()
        else:
            assert expected in _refused(["--config", str(path)])
    path.write_bytes("model: caf\u00e9\n".encode("latin-1"))
    assert _refused(["--config", str(path)]) == f"{path}:1: not UTF-8 text (byte 0xe9); save the file as UTF-8"
    assert "flag --training:1: key 'max_steps' appears twice" in _refused(["--training", "{max_steps: 1, max_steps: 2}"])
    # two files: the second replaced the first, whose settings (and its syntax errors) went unseen
    other = tmp_path / "other.yaml"
    other.write_text("training:\n  max_steps: 7\n", encoding="utf-8")
    assert _refused(["--config", str(other), "--config", str(path)]) == (
        f"--config given twice ({other}, {path}): give one file; flags override its settings")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--training.num-train-epochs", "3"], "training.num_train_epochs: used only when training.max_steps is -1"),
        (["--data.seed", "7"], "data.seed: it seeds the shuffle and test_size's held-out rows, and neither is on (set data.shuffle: true or data.test_size)"),
        (["--judge.base-url", "http://x/v1", "--judge.api-key-env", "K"],
         "judge.base_url, judge.api_key_env: only the 'openai' backend uses them"),
        (["--output.hub-token-secret", "hub"], "output.hub_token_secret: they apply to a hub push"),
        (["--wandb.mode", "disabled", "--wandb.log-model"], "wandb.log_model: nothing is logged with wandb.mode 'disabled'"),
        (["--judge.backend", "openai", "--judge.model", "m", "--judge.base-url", "http://me:pw@127.0.0.1:8000/v1"],
         "judge.base_url: holds a user name or password, which the run's config would record"),
        # The judge sends its key to base_url, both from settings anyone who can start a run writes.
        (["--judge.backend", "openai", "--judge.model", "m", "--judge.base-url", "http://evil.example/v1",
          "--judge.api-key-env", "AWS_SECRET_ACCESS_KEY"], "judge.api_key_env='AWS_SECRET_ACCESS_KEY': the judge "
         "sends this variable to judge.base_url, so it must be a judge's key: a name ending in _API_KEY other than"),
        (["--judge.backend", "openai", "--judge.model", "m", "--judge.base-url", "http://evil.example/v1",
          "--judge.api-key-env", "WANDB_API_KEY"], "judge.api_key_env='WANDB_API_KEY': the judge sends"),
        (["--judge.backend", "openai", "--judge.model", "m", "--judge.base-url", "http://evil.example/v1",
          "--judge.api-key-secret", "hub-token"], "judge.api_key_secret='hub-token': the judge sends this Secret "
         "block to judge.base_url, so it must be a judge's key: a block name ending in 'api-key'"),
        (["--judge.backend", "openai", "--judge.model", "m", "--judge.base-url", "http://127.0.0.1:8000/v1?api-key=abc"],
         "judge.base_url: its query holds a key or token, which the run's config would record"),
        (["--judge.enabled", "false", "--judge.limit", "3", "--judge.model", "m"],
         "judge.model, judge.limit: judge.enabled is false, so the judge does not run; remove them"),
        (["--gate.enabled", "false", "--gate.tolerance", "0.02"],
         "gate.tolerance: gate.enabled is false, so nothing is promoted; remove it"),
    ],
)
def test_a_setting_that_would_have_no_effect_is_refused(argv, message):
    assert message in _refused(argv)


def test_an_s3_root_with_credentials_in_it_is_refused_without_echoing_them():
    """s3://KEY:SECRET@bucket: S3 takes no credentials from the URI, and the setting is recorded
    (config.json, W&B, the served deployments' parameters in Prefect's UI): refused, not echoed."""
    from tasks.arena_config import ArenaConfig
    from tasks.config_args import serve_config

    root = "s3://AKIDEXAMPLE:hidden-key-1234@bucket/smolflow"
    for refused in (lambda: parse_config(["--output.artifacts-uri", root]),
                    lambda: serve_config(["--output.artifacts-uri", root]),
                    lambda: serve_config(["--arena.artifacts-uri", root])):
        with pytest.raises(UserError) as err:
            refused()
        assert "artifacts_uri: holds credentials (user:password@)" in str(err.value)
        assert "hidden-key" not in str(err.value)
    with pytest.raises(ValueError, match="artifacts_uri: holds credentials") as err:
        ArenaConfig(artifacts_uri=root)
    assert "hidden-key" not in str(err.value)
    assert parse_config(["--output.artifacts-uri", "s3://bucket/a@b"]).output.artifacts_uri == "s3://bucket/a@b"


def test_the_same_settings_are_accepted_where_they_apply():
    cfg = parse_config(["--training.num-train-epochs", "3", "--training.max-steps", "-1", "--data.seed", "7",
                        "--data.shuffle", "--judge.backend", "openai", "--judge.base-url", "http://x/v1",
                        "--judge.model", "m", "--output.push-to-hub", "me/model", "--output.hub-private", "false",
                        "--judge.api-key-env", "JUDGE_API_KEY"])
    assert (cfg.training.num_train_epochs, cfg.data.seed, cfg.judge.base_url, cfg.output.hub_private) == (3, 7, "http://x/v1", False)
    RunConfig.model_validate(RunConfig().model_dump())  # the UI sends every field, defaults included
    off = RunConfig(judge={"enabled": False}, gate={"enabled": False})
    RunConfig.model_validate(off.model_dump())  # switched off in the UI: the other fields come at their defaults


@pytest.mark.parametrize(
    ("sft_args", "message"),
    [
        ({"eos_token": "<|endoftext|>"}, "the chat template decides EOS"),
        ({"chat_template_path": "t.jinja"}, "use template.chat_template"),
        ({"completion_only_loss": True}, "set template.assistant_only_loss: true"),
        ({"max_seq_length": 512}, "TRL's SFTConfig has no field 'max_seq_length' any more; use training.max_length"),
        ({"save_only_model": True}, "checkpoints would lack the optimizer and scheduler state"),
        ({"model_init_kwargs": {"dtype": "bfloat16"}}, "smolflow loads the model"),
        ({"enable_jit_checkpoint": True}, "a stopped or cancelled run ends 'stopped'"),
        ({"packing": True}, "set training.padding_free: false as well"),
        ({"adam_beta1": 5}, "adam_beta1: 5.0 is not in [0, 1)"),
    ],
)
def test_sft_args_that_would_be_ignored_undo_smolflows_own_or_fail_late_are_refused(sft_args, message):
    from tasks.training import sft_overrides

    with pytest.raises(ValueError, match=re.escape(message)):
        sft_overrides(parse_config(["--training.sft-args", json.dumps(sft_args)]).training)


def test_cross_check_errors_name_the_file_line_or_flag(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("judge:\n  enabled: false\ntraining:\n  sft_args:\n    max_grad_normz: 0.5\n")
    argv = ["--config", str(path), "--benchmarks", "[{name: mmlu, subsets: [astronmy]}]"]
    assert locate(argv, "training.sft_args.max_grad_normz: no such field") == f"{path}:5: training.sft_args.max_grad_normz: no such field"
    assert locate(argv, "benchmarks[0].subsets: unknown") == "flag --benchmarks: benchmarks[0].subsets: unknown"
    assert locate(argv, "model: not found") == "model: not found"  # set nowhere: the default


def test_a_section_check_blames_the_flag_or_line_of_the_field_it_names(tmp_path):
    """A section's own check fails at the section; the flag (or line) to blame is the named field's,
    not the section's first flag (`flag --wandb.mode: wandb.project: ...` before)."""
    for argv, expected in (
        (["--wandb.mode", "disabled", "--wandb.project", "x"], "flag --wandb.project: wandb.project: nothing is logged"),
        (["--judge.enabled", "false", "--judge.limit", "3"], "flag --judge.limit: judge.limit: judge.enabled is false"),
        (["--execution.task-runner", "local", "--execution.ray-num-cpus", "2"],
         "flag --execution.ray-num-cpus: execution.ray_num_cpus: it needs execution.task_runner 'ray'"),
    ):
        with pytest.raises(UserError) as err:
            parse_config(argv)
        assert str(err.value).startswith(expected)
    path = tmp_path / "run.yaml"
    path.write_text("wandb:\n  mode: disabled\n  project: x\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:3: wandb.project: nothing is logged")):
        parse_config(["--config", str(path)])


def test_lora_modules_the_model_lacks_are_named_before_it_loads(tiny_model_dir):
    from tasks.checks import ConfigError
    from tasks.checks_training import check_lora_targets

    config = parse_config(["--model", str(tiny_model_dir), "--training.peft", "{target_modules: [q_projj, v_proj]}"])
    with pytest.raises(ConfigError, match=r"\['q_projj'\] match no module of .*did you mean 'q_proj' for 'q_projj'\?"):
        check_lora_targets(config)
    check_lora_targets(parse_config(["--model", str(tiny_model_dir), "--training.peft", "{target_modules: [self_attn.q_proj, v_proj]}"]))


def test_lora_modules_of_the_builtin_model_are_checked_before_its_first_conversion(tmp_path, monkeypatch):
    # A fresh machine (no converted built-in model yet): the check passed, the run failed after its samples.
    from tasks.checks import ConfigError
    from tasks.checks_training import check_lora_targets
    from tasks.models import builtin_target

    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    config = parse_config(["--model", "builtin:smollm2-135m-instruct", "--training.peft", "{target_modules: [q_projx]}"])
    with pytest.raises(ConfigError, match=r"\['q_projx'\] match no module of 'builtin:.*did you mean 'q_proj' for 'q_projx'\?"):
        check_lora_targets(config)
    check_lora_targets(config.model_copy(update={"training": config.training.model_copy(
        update={"peft": config.training.peft.model_copy(update={"target_modules": ["q_proj", "v_proj"]})})}))
    assert not builtin_target().exists()  # read from the GGUF, nothing converted
