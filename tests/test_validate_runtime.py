"""Settings that used to pass `smolflow validate` and fail at run time, now refused (or, for
`wandb.mode: auto`, resolved) at validation, naming the field and the fix: W&B without a key or a
network, learning-rate schedules that cannot be built, SFTConfig flags whose package is missing,
assistant-only loss on a template without {% generation %} markers."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.config import RunConfig, WandbConfig
from tasks.config_args import parse_config
from tasks.config_base import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SMOLFLOW = Path(sys.executable).parent / "smolflow"


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    """No W&B credentials anywhere: no key variables, an empty .netrc; no cached host probe."""
    import tasks.reachable

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setattr(tasks.reachable, "_wandb_probes", {}, raising=False)
    return tmp_path / "netrc"


def _wandb_reachable_here() -> bool:
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
        return True
    except OSError:
        return False


# ---- W&B ----------------------------------------------------------------------------------------


def test_online_without_a_key_is_refused_naming_the_field(no_wandb_key):
    from tasks.reachable import check_wandb

    with pytest.raises(ConfigError, match=r"^wandb\.mode='online': no W&B API key .*export WANDB_API_KEY or run "
                                          r"`wandb login`, or set wandb\.mode to 'auto'"):
        check_wandb(WandbConfig(mode="online"))
    check_wandb(WandbConfig(mode="offline"))  # nothing to check
    check_wandb(WandbConfig())  # auto: falls back instead


def test_a_netrc_entry_is_a_key_as_for_wandb(no_wandb_key, monkeypatch, closed_port):
    from tasks.reachable import check_wandb

    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    no_wandb_key.write_text(f"machine 127.0.0.1:{closed_port}\n  login user\n  password {'k' * 40}\n")
    with pytest.raises(ConfigError, match="is unreachable"):  # past the key check: the host is the problem now
        check_wandb(WandbConfig(mode="online"))


def test_online_with_a_closed_port_is_refused_within_seconds(no_wandb_key, monkeypatch, closed_port):
    from tasks.reachable import check_wandb

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    started = time.perf_counter()
    refused = (rf"^wandb\.mode='online': http://127\.0\.0\.1:{closed_port} is unreachable \(.*refused.*\); "
               r"fix the network \(or WANDB_BASE_URL\), or set wandb\.mode")
    with pytest.raises(ConfigError, match=refused):
        check_wandb(WandbConfig(mode="online"))
    assert time.perf_counter() - started < 5


def test_credentials_in_wandb_base_url_stay_out_of_the_message(no_wandb_key, monkeypatch, closed_port):
    from tasks.reachable import check_wandb

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://wbuser:wbPASSinURL555@127.0.0.1:{closed_port}")
    with pytest.raises(ConfigError, match=rf"'online': http://127\.0\.0\.1:{closed_port} is unreachable") as refused:
        check_wandb(WandbConfig(mode="online"))
    assert "wbPASS" not in str(refused.value) and "wbuser" not in str(refused.value)


def test_credentials_in_hf_endpoint_stay_out_of_the_message(monkeypatch, closed_port):
    from huggingface_hub import constants

    from tasks.reachable import hub_unreachable

    monkeypatch.setattr(constants, "ENDPOINT", f"http://hfuser:hfPASSinURL555@127.0.0.1:{closed_port}")
    why = hub_unreachable(timeout=2)
    assert why.startswith(f"http://127.0.0.1:{closed_port} is unreachable")
    assert "hfPASS" not in why and "hfuser" not in why


def test_online_to_the_real_wandb_host_without_a_network_is_refused(no_wandb_key, monkeypatch):
    if _wandb_reachable_here():
        pytest.skip("this machine reaches api.wandb.ai")
    from tasks.reachable import check_wandb

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^wandb\.mode='online': https://api\.wandb\.ai is unreachable"):
        check_wandb(WandbConfig(mode="online"))
    assert time.perf_counter() - started < 5


def test_the_probe_is_bounded_even_when_the_name_lookup_hangs(monkeypatch):
    import urllib.request

    from tasks.reachable import endpoint_unreachable

    release = threading.Event()
    def hangs(*args, **kwargs):  # a resolver that never answers
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(urllib.request, "urlopen", hangs)
    started = time.perf_counter()
    assert endpoint_unreachable("https://api.wandb.ai", timeout=0.5) == "no answer within 0.5 s"
    assert time.perf_counter() - started < 2
    release.set()


@pytest.mark.parametrize("real_host", [False, True])
def test_auto_with_a_key_and_no_network_logs_offline_says_why_once_and_records_it(
        no_wandb_key, monkeypatch, closed_port, tmp_path, real_host):
    from tasks.checks import resolve_autos
    from tasks.runtime import run_logger
    from tasks.tracking import finish_run, start_wandb, wandb_mode

    if real_host and _wandb_reachable_here():
        pytest.skip("this machine reaches api.wandb.ai")
    if not real_host:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    host = "https://api.wandb.ai" if real_host else f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    started = time.perf_counter()
    assert wandb_mode(WandbConfig()) == "offline"  # it was 'online', then a CommError ~1m42s into the run
    assert time.perf_counter() - started < 5
    from tasks.reachable import auto_wandb_mode

    mode, why = auto_wandb_mode(WandbConfig())  # the same answer, from the probe just made
    assert mode == "offline" and why.startswith(f"WANDB_API_KEY is set but {host} is unreachable (")
    # What the run records as what `auto` meant (resolved.json, the manifest, the report)
    assert resolve_autos(RunConfig())["wandb.mode"] == f"offline ({why})"

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = getattr(run_logger(), "logger", run_logger())  # outside a flow: the "smolflow" logger
    logger.addHandler(handler)
    try:
        wb = start_wandb(WandbConfig(), "auto-offline", {}, tmp_path / "wandb", None)
    finally:
        logger.removeHandler(handler)
    try:
        assert Path(wb.dir).parent.name.startswith("offline-run-")  # offline files, not a CommError
    finally:
        finish_run(wb, [])
    warnings = [r.getMessage() for r in records if "wandb.mode" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"wandb.mode 'auto': logging offline, WANDB_API_KEY is set but {host} is unreachable")


def test_auto_without_a_key_is_offline_quietly_and_never_probes(no_wandb_key, monkeypatch):
    import tasks.reachable
    from tasks.checks import resolve_autos

    monkeypatch.setattr(tasks.reachable, "endpoint_unreachable", lambda *a, **k: pytest.fail("probed"))
    assert tasks.reachable.auto_wandb_mode(WandbConfig()) == ("offline", None)
    assert resolve_autos(RunConfig())["wandb.mode"] == "offline"
    assert "wandb.mode" not in resolve_autos(RunConfig(wandb={"mode": "offline"}))


def _smolflow(*args, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_API_KEY")}
    environ.update(PYTHONPATH=str(ROOT), NETRC=str(tmp_path / "no-netrc"), **env)
    return subprocess.run([str(SMOLFLOW), *args], capture_output=True, text=True, env=environ, cwd=tmp_path,
                          timeout=600)


def test_run_refuses_online_without_a_key_in_one_line_before_anything_starts(tmp_path):
    out = _smolflow("run", "--wandb.mode", "online", "--output.artifacts-uri", str(tmp_path / "runs"),
                    tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "smolflow run: error: flag --wandb.mode: wandb.mode='online': no W&B API key (WANDB_API_KEY is not set and "
        "~/.netrc has no entry for machine api.wandb.ai); export WANDB_API_KEY or run `wandb login`, or set "
        "wandb.mode to 'auto' (online when a key is set) or 'offline'"]
    assert not (tmp_path / "runs").exists()


def test_validate_names_wandb_and_the_template_with_exit_2(tmp_path, closed_port):
    out = _smolflow("validate", "--judge.enabled", "false", "--wandb.mode", "online", "--template.assistant-only-loss",
                    "--template.chat-template", "mistral", tmp_path=tmp_path, WANDB_API_KEY="k" * 40,
                    WANDB_BASE_URL=f"http://127.0.0.1:{closed_port}")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("smolflow validate:")]
    assert lines[0].startswith(f"smolflow validate: cross-checks: flag --template.assistant-only-loss: "
                               "template.assistant_only_loss=true needs {% generation %} markers")
    assert lines[1].startswith(f"smolflow validate: wandb: flag --wandb.mode: wandb.mode='online': "
                               f"http://127.0.0.1:{closed_port} is unreachable")
    assert out.stderr.rstrip().endswith("2 problem(s)")


# ---- the learning-rate schedule -----------------------------------------------------------------


def _training_check(*argv: str) -> None:
    from tasks.checks_training import check_training

    check_training(parse_config(["--judge.enabled", "false", *argv]))


def test_a_schedule_that_needs_arguments_is_refused_naming_the_field():
    needs = (r"^training\.lr_scheduler_type: transformers cannot build the 'cosine_with_min_lr' schedule with "
             r"lr_scheduler_kwargs=\{\}: .*min_lr_rate.*set training\.sft_args\.lr_scheduler_kwargs to what it "
             r"takes \(e\.g\. \{min_lr_rate: 0\.1\}\)")
    with pytest.raises(ConfigError, match=needs):
        _training_check("--training.lr-scheduler-type", "cosine_with_min_lr")
    _training_check("--training.lr-scheduler-type", "cosine_with_min_lr",
                    "--training.sft-args", "{lr_scheduler_kwargs: {min_lr_rate: 0.1}}")
    _training_check("--training.lr-scheduler-type", "cosine")


def test_arguments_a_schedule_does_not_take_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"^training\.sft_args\.lr_scheduler_kwargs: transformers cannot build the "
                                          r"'cosine' schedule .*unexpected keyword argument 'min_lr_rate'; remove "
                                          r"training\.sft_args\.lr_scheduler_kwargs"):
        _training_check("--training.lr-scheduler-type", "cosine",
                        "--training.sft-args", "{lr_scheduler_kwargs: {min_lr_rate: 0.1}}")
    with pytest.raises(ConfigError, match=r"^training\.sft_args\.lr_scheduler_kwargs: .*'linear' schedule"):
        # JSON text, as transformers also takes it
        _training_check("--training.sft-args", '{lr_scheduler_kwargs: "{\\"num_cycles\\": 2}"}')


# ---- optional packages --------------------------------------------------------------------------


def test_liger_kernel_without_its_package_is_refused_with_the_install_command():
    from tasks.checks_training import _installed

    if _installed("liger_kernel"):
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(ConfigError, match=r"^training\.sft_args\.use_liger_kernel: needs the liger-kernel package, "
                                          r"which is not installed here; pip install liger-kernel"):
        _training_check("--training.sft-args", "{use_liger_kernel: true}")
    _training_check("--training.sft-args", "{use_liger_kernel: false}")


def test_deepspeed_and_optimizers_without_their_package_are_refused(monkeypatch):
    import tasks.checks_training

    if not tasks.checks_training._installed("bitsandbytes"):
        with pytest.raises(ConfigError, match=r"^training\.optim='adamw_bnb_8bit': needs the bitsandbytes package.*"
                                              r"pip install bitsandbytes"):
            _training_check("--training.optim", "adamw_bnb_8bit")
    monkeypatch.setattr(tasks.checks_training, "_installed", lambda module: module not in ("deepspeed", "galore_torch"))
    with pytest.raises(ConfigError, match=r"^training\.sft_args\.deepspeed: needs the deepspeed package.*"
                                          r"pip install deepspeed"):
        _training_check("--training.sft-args", "{deepspeed: ds.json}")
    with pytest.raises(ConfigError, match=r"pip install galore-torch"):
        _training_check("--training.optim", "galore_adamw")
    _training_check("--training.optim", "adamw_torch")


# ---- assistant-only loss needs {% generation %} markers -----------------------------------------


def _template_check(*argv: str) -> None:
    from tasks.checks_training import check_template

    check_template(parse_config(["--judge.enabled", "false", *argv]))


def test_assistant_only_loss_on_a_template_without_markers_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^template\.assistant_only_loss=true needs \{% generation %\} markers .*"
                                         r"template\.chat_template='mistral' has none"):
        _template_check("--template.assistant-only-loss", "--template.chat-template", "mistral")
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    with pytest.raises(ValueError, match=rf"^template\.assistant_only_loss=true needs .*'{plain}' has none"):
        _template_check("--template.assistant-only-loss", "--template.chat-template", str(plain))
    marked = tmp_path / "marked.jinja"
    marked.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{%- generation -%}{{ m.content }}<|im_end|>"
                      "{%- endgeneration -%}\n{% endfor %}")
    _template_check("--template.assistant-only-loss", "--template.chat-template", str(marked))
    for ok in ("chatml", "chatml-assistant-only", "llama3"):
        _template_check("--template.assistant-only-loss", "--template.chat-template", ok)
    _template_check("--template.chat-template", "mistral")  # without assistant-only loss: fine


def test_a_template_file_that_never_ends_a_reply_is_refused_before_the_run(tiny_model_dir, tmp_path):
    """validate said OK; the run then failed in the flow (a failed run folder) without naming the field."""
    endless = tmp_path / "endless.jinja"
    endless.write_text("hello {{ messages[0]['content'] }}")
    with pytest.raises(ValueError, match=rf"^template\.chat_template='{endless}': template '{endless}' writes "
                                         r"nothing after an assistant reply"):
        _template_check("--model", str(tiny_model_dir), "--template.chat-template", str(endless))
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    _template_check("--model", str(tiny_model_dir), "--template.chat-template", str(good))


def test_the_models_own_template_is_read_when_the_model_is_here(tiny_model_dir, tmp_path):
    import shutil

    _template_check("--model", str(tiny_model_dir), "--template.assistant-only-loss")  # ChatML: switched, not refused
    other = tmp_path / "mistral-model"
    shutil.copytree(tiny_model_dir, other)
    (other / "chat_template.jinja").write_text((ROOT / "tasks/chat_templates/mistral.jinja").read_text())
    with pytest.raises(ValueError, match=r"template\.assistant_only_loss=true needs .*chat_template='model' has none"):
        _template_check("--model", str(other), "--template.assistant-only-loss")


def test_check_run_includes_the_template_check():
    from tasks.checks import check_run

    with pytest.raises(ValueError, match=r"^template\.assistant_only_loss=true needs"):
        check_run(parse_config(["--judge.enabled", "false", "--template.assistant-only-loss",
                                "--template.chat-template", "mistral"]))


def test_workers_that_would_import_this_folders_tasks_package_are_refused(tmp_path, monkeypatch):
    """Run from a folder with a `tasks` package of its own (a Prefect project), DDP's ranks and a local
    Ray cluster's workers import that one (their import path starts there) and fail: said at
    validation, naming the setting. One process and no Ray import nothing from the folder."""
    from tasks.checks import check_worker_imports

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("raise ImportError('the folder\\'s own tasks')\n", encoding="utf-8")
    # What a rank does from here: the folder's package is imported, not smolflow's.
    rank = subprocess.run([sys.executable, "-m", "tasks.train_worker"], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=60)
    assert rank.returncode == 1 and "ImportError: the folder's own tasks" in rank.stderr
    monkeypatch.chdir(tmp_path)
    for settings, field in (({"training": {"num_processes": 2}}, "training.num_processes"),
                            ({"execution": {"task_runner": "ray"}}, "execution.task_runner")):
        with pytest.raises(ConfigError, match=f"^{field}: its worker processes would import {tmp_path}/tasks/__init__.py"):
            check_worker_imports(RunConfig.model_validate(settings))
    check_worker_imports(RunConfig())
    check_worker_imports(RunConfig.model_validate({"execution": {"task_runner": "ray", "ray_address": "ray://head:10001"}}))
