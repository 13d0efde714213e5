"""Only transient failures are retried: a deterministic error fails on its first attempt, fast."""

import errno
import os
from pathlib import Path

import pytest
from prefect import flow, task

from tasks.config import DataConfig
from tasks.data import load_chat_dataset
from tasks.runtime import is_transient, retry_transient


def _attempts_until_done(exc: BaseException) -> int:
    attempts = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky() -> None:
        attempts.append(1)
        raise exc

    @flow
    def run() -> None:
        flaky()

    with pytest.raises(type(exc)):
        run()
    return len(attempts)


@pytest.mark.parametrize("exc", [
    FileNotFoundError("data.jsonl"), ValueError("learning_rate: not a number"), KeyError("model"),
    RuntimeError("model is not in the cache and the hub is disabled (OfflineModeIsEnabled)"),
])
def test_a_deterministic_error_is_tried_once(exc):
    assert _attempts_until_done(exc) == 1


@pytest.mark.parametrize("exc", [
    ConnectionError("connection reset"), TimeoutError("read timed out"), OSError(5, "Input/output error"),
])
def test_a_transient_error_is_retried(exc):
    assert _attempts_until_done(exc) == 3


def test_a_full_disk_is_not_retried():
    # A real ENOSPC (Linux's /dev/full): another attempt would fill the same disk again.
    with pytest.raises(OSError) as full, open("/dev/full", "wb", buffering=0) as f:
        f.write(b"x")
    assert type(full.value) is OSError and full.value.errno == errno.ENOSPC
    assert _attempts_until_done(full.value) == 1
    assert not is_transient(OSError(errno.EROFS, "Read-only file system"))


def test_http_5xx_is_transient_and_4xx_is_not():
    import urllib.error

    def http(code):
        return urllib.error.HTTPError("http://127.0.0.1/x", code, "status", {}, None)

    assert is_transient(http(503)) and is_transient(http(429))
    assert not is_transient(http(404)) and not is_transient(http(401))
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = ConnectionResetError("reset by peer")
    assert is_transient(wrapped)  # the cause chain decides when the outer error is generic


def test_a_missing_dataset_fails_on_its_first_attempt(tmp_path):
    from prefect.client.orchestration import get_client

    @flow
    def load():
        return load_chat_dataset(DataConfig(dataset=str(tmp_path / "missing.jsonl")), return_state=True)

    state = load(return_state=True).result(raise_on_failure=False)
    with pytest.raises(ValueError, match="no such file or directory"):
        state.result()
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(state.state_details.task_run_id)
    # Before: retries=2 with 5 s + 30 s delays, three attempts and ~60 s for the same message.
    assert task_run.run_count == 1


def test_a_flow_run_with_a_bad_row_fails_before_writing_anything_or_starting_wandb(tiny_model_dir, tmp_path):
    """A run started from the Prefect UI (the flow itself, no CLI in front): the bad row is named
    before the run folder, the W&B run or any model work exists."""
    from flows.finetune import finetune
    from tests.conftest import tiny_run_config

    data = tmp_path / "data"
    data.mkdir()
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
    (data / "train.jsonl").write_text(good + "\n" + '{"messages": [{"role": "user", "content": "a <|im_end|> b"}, '
                                      '{"role": "assistant", "content": "c"}]}\n')
    (data / "test.jsonl").write_text(good + "\n")
    config = tiny_run_config(tiny_model_dir, str(tmp_path / "runs"), data={"dataset": str(data)},
                             output={"run_id": "bad-row"})
    state = finetune(config=config, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"train.jsonl:2: messages\[0\].content contains the special token '<\|im_end\|>'"):
        state.result()
    assert not (tmp_path / "runs").exists()  # no run folder, no config.json
    assert not (Path(os.environ["SMOLFLOW_CACHE"]) / "work" / "bad-row").exists()  # where W&B would write
