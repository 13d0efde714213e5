"""The console switch: quiet drops the library chatter a run produces, verbose shows it."""

import logging

import pytest

from tasks.console import configure_logging, keep_root_level, verbose


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=0)
        self.lines: list[str] = []

    def emit(self, record):
        if record.name.startswith(("lm_eval", "httpx", "smolflow")):  # the loggers these tests talk through
            self.lines.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture
def collected(monkeypatch):
    monkeypatch.delenv("SMOLFLOW_VERBOSE", raising=False)
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    configure_logging(False)  # the rest of the session stays quiet, as a run is


def _library_chatter():
    lm_eval = logging.getLogger("lm_eval.models.huggingface")
    for _ in range(2):
        lm_eval.warning("`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.")
        lm_eval.warning("Some other lm-eval warning")
        logging.getLogger("httpx").info('HTTP Request: POST http://127.0.0.1:4200/api/logs/ "HTTP/1.1 201 Created"')
        logging.getLogger("smolflow").warning("Finished in state Completed()")


def test_quiet_drops_expected_and_repeated_warnings_and_httpx(collected):
    assert configure_logging() is False and not verbose()
    with keep_root_level():
        logging.getLogger().setLevel(logging.INFO)  # what importing alpaca_eval does
    assert logging.getLogger().level == logging.WARNING
    _library_chatter()
    assert collected.lines == [
        "lm_eval.models.huggingface: Some other lm-eval warning",  # once
        "smolflow: Finished in state Completed()",  # not a library's: its repeats stay (e.g. one per task)
        "smolflow: Finished in state Completed()",
    ]


def test_verbose_shows_library_logs(collected, monkeypatch):
    monkeypatch.setenv("SMOLFLOW_VERBOSE", "1")
    assert configure_logging() is True and verbose()
    logging.getLogger().setLevel(logging.INFO)
    try:
        _library_chatter()
    finally:
        logging.getLogger().setLevel(logging.WARNING)
    assert sum("`pretrained` model kwarg" in line for line in collected.lines) == 2
    assert sum(line.startswith("httpx: HTTP Request") for line in collected.lines) == 2


def _peft_warnings() -> list[str]:
    """The Python warnings that wrapping a model in LoRA raises, as `training.peft` does."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters configure_logging set
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def test_library_deprecation_notices_only_when_verbose(collected, monkeypatch):
    # A LoRA run printed transformers' FutureWarning about `is_gradient_checkpointing` (asked by peft)
    # in the middle of the quiet console.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("default", FutureWarning)  # Python's default; pyproject's pytest settings ignore them
        configure_logging(False)
        assert not any("is_gradient_checkpointing" in w for w in _peft_warnings())
        monkeypatch.setenv("SMOLFLOW_VERBOSE", "1")
        configure_logging()
        assert any(w.startswith("FutureWarning") and "is_gradient_checkpointing" in w for w in _peft_warnings())


def test_the_gguf_readers_bar_is_swallowed_unless_verbose(capfd, monkeypatch):
    # The built-in model's conversion (tasks/models.py) drew this bar in quiet runs: transformers'
    # GGUF reader uses tqdm directly, which its progress-bar switch does not reach.
    from transformers.modeling_gguf_pytorch_utils import tqdm

    from tasks.console import ENV, quiet_bars

    for setting, shown in (("", False), ("1", True)):
        monkeypatch.setenv(ENV, setting)
        with quiet_bars():
            for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
                pass
        assert ("de-quantizing" in capfd.readouterr().err) is shown


def test_the_arena_flow_is_quiet_like_the_finetune_flow(tmp_path):
    # A served or UI-started arena run (the after-nightly) has no CLI in front: the flow itself turns
    # transformers' "Loading weights" bars off, as smolflow-finetune and smolflow-evaluate do.
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import transformers\n"
        "transformers.utils.logging.enable_progress_bar()  # a fresh process's default\n"
        "from flows.arena import arena\n"
        "from tasks.arena_config import ArenaConfig\n"
        "try:\n"
        "    arena.fn(ArenaConfig(prompts='missing.jsonl', judge={'enabled': False}))\n"
        "except ValueError:\n"
        "    pass  # the prompts file is missing: the flow stops there\n"
        "print(transformers.utils.logging.is_progress_bar_enabled())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SMOLFLOW_VERBOSE"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.stdout.strip().splitlines()[-1:] == ["False"], done.stdout + done.stderr


def test_verbose_httpx_lines_carry_no_password_from_a_url(collected, monkeypatch):
    """A Prefect server behind basic auth (PREFECT_API_URL=https://user:password@host/api): verbose,
    httpx logs every API call's URL, which went to the console and W&B's output.log as given."""
    import httpx

    monkeypatch.setenv("SMOLFLOW_VERBOSE", "1")
    configure_logging()
    with httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200))) as client:
        client.get("http://audit:SECRET-pw-1234@127.0.0.1:4280/api/health")
    requests = [line for line in collected.lines if line.startswith("httpx: HTTP Request")]
    assert requests == ['httpx: HTTP Request: GET http://127.0.0.1:4280/api/health "HTTP/1.1 200 OK"']
    # Prefect's engine, quiet or not: "View at <PREFECT_UI_URL>...", derived from PREFECT_API_URL.
    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logging.getLogger("prefect.flow_runs").addHandler(handler)
    try:
        logging.getLogger("prefect.flow_runs").warning("View at %s/runs/flow-run/1", "http://audit:SECRET-pw-1234@host")
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(handler)
    assert shown == ["View at http://host/runs/flow-run/1"]
