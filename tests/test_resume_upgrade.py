"""Resume across an upgrade: a run stopped mid-training, then `git pull`, then the same run id again.

The tokens' cache key hashes the code that makes them (tasks/data.py's bytes are in the data's
fingerprint, tokenize_split's source in the tokens' key), so nearly every upgrade tokenizes again
into a new cache entry, under a new key, with the same token ids. The resume key hashed that cache
key: the re-run found its checkpoints 'foreign', deleted them and trained from step 0 (reproduced
with the code of 30 and 100 commits back: `Training from step 0`, resumed_from_step 0)."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tasks.config import DataConfig, TemplateConfig, TrainingConfig
from tasks.data import load_chat_dataset
from tasks.storage import ArtifactStore
from tasks.templates import prepare_chat_template
from tasks.tokenization import content_digest
from tasks.training import train_sft
from tests.conftest import tokens_of
from tests.test_training_resume import ROOT, TRAIN, complete_steps


@pytest.mark.slow
def test_a_stopped_run_resumes_after_an_upgrade_that_makes_the_same_tokens(tiny_ref, fixture_data, tmp_path):
    cfg = TrainingConfig(max_steps=12, save_steps=3, logging_steps=1, eval_steps=12, max_length=128)
    run = ArtifactStore(str(tmp_path / "artifacts" / "runs" / "upgrade-1"))
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, tiny_ref.path, run.uri, cfg.model_dump_json()],
                            cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not complete_steps(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)  # what a cancel in Prefect or systemctl stop sends
        _, err = proc.communicate(timeout=60)
    done = complete_steps(run)
    assert done and max(done) < cfg.max_steps, f"no checkpoint before the stop:\n{err.decode()[-2000:]}"

    # The upgraded code tokenizes the same rows again: another cache entry, another key, same ids.
    tokens = tokens_of(tiny_ref, fixture_data, cfg)
    shutil.copytree(tokens.path, tmp_path / "tokenized-by-the-new-code")
    upgraded = tokens.model_copy(update={"path": str(tmp_path / "tokenized-by-the-new-code"),
                                         "key": hashlib.sha256(b"the upgraded code's cache key").hexdigest()})
    result = train_sft.fn(tiny_ref, upgraded, cfg, run.uri, [])

    assert result.metrics["resumed_from_step"] == max(done), "the upgrade threw the stopped run's checkpoints away"
    assert result.metrics["steps"] == cfg.max_steps
    assert [h["step"] for h in result.log_history if "loss" in h] == list(range(1, cfg.max_steps + 1))


def test_the_resume_key_still_tells_other_tokens_apart(tiny_ref, fixture_data):
    """Keyed by content, other rows or another max_length still never resume each other's checkpoints."""
    cfg = TrainingConfig(max_length=128)
    same = content_digest(tokens_of(tiny_ref, fixture_data, cfg))
    assert content_digest(tokens_of(tiny_ref, fixture_data, cfg)) == same
    assert content_digest(tokens_of(tiny_ref, fixture_data, TrainingConfig(max_length=64))) != same
    fewer = load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations", max_train_rows=8))
    assert content_digest(tokens_of(tiny_ref, fewer, cfg)) != same
    marked = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template="chatml-assistant-only",
                                                                             assistant_only_loss=True)).model
    every_token = content_digest(tokens_of(marked, fixture_data, cfg))
    masked = content_digest(tokens_of(marked, fixture_data, cfg, assistant_only=True))
    assert masked != every_token  # the same ids, another loss mask: it trains too
