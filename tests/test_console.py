"""The console switch: quiet drops the library chatter a run produces, verbose shows it."""

import logging

import pytest

from tasks.console import configure_logging, keep_root_level, verbose


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=0)
        self.lines: list[str] = []

    def emit(self, record):
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
        logging.getLogger("prefect.task_runs").warning("Finished in state Completed()")


def test_quiet_drops_expected_and_repeated_warnings_and_httpx(collected):
    assert configure_logging() is False and not verbose()
    with keep_root_level():
        logging.getLogger().setLevel(logging.INFO)  # what importing alpaca_eval does
    assert logging.getLogger().level == logging.WARNING
    _library_chatter()
    assert collected.lines == [
        "lm_eval.models.huggingface: Some other lm-eval warning",  # once
        "prefect.task_runs: Finished in state Completed()",  # Prefect's own lines repeat: one per task
        "prefect.task_runs: Finished in state Completed()",
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
