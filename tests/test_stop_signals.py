"""A stop signal (a cancel in Prefect sends SIGTERM; Ctrl-C) raises in the main thread at whatever
bytecode it is running, and a SIGKILL stops it there for good: what was half done at that moment
must not be taken as done by the next run. Each case is a real process that sends itself the
signal at the exact moment (a wrapped function, as tests/test_training_lock.py does), then the next
run's own code reads what it left."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Retention's cache bound, SIGTERMed right after the first file of an evicted entry is deleted.
EVICT_THEN_SIGTERM = """
import os, signal, sys
from tasks.leftovers import exit_on_termination
from tasks.retention import gc

unlink = os.unlink
def unlink_then_sigterm(path, *args, **kwargs):
    unlink(path, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
os.unlink = unlink_then_sigterm
exit_on_termination()
gc(sys.argv[1], cache_max_gb=0)
"""


def _env(**extra: str) -> dict:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PYTHONPATH": str(ROOT)} | extra


def test_an_eviction_cut_off_by_sigterm_leaves_no_half_entry_that_the_next_run_reuses(
        tiny_ref, tmp_path, monkeypatch):
    """The cache bound deletes an entry file by file; a cancel in the middle left the tokenized
    entry with its stats.json and without a split's Arrow file: every later run with that data took
    it as cached and failed in training (FileNotFoundError: .../test.arrow)."""
    from tasks.cache_limit import plan_cache
    from tasks.config import DataConfig
    from tasks.data import load_chat_dataset
    from tasks.tokenization import load_tokenized, tokenized_splits

    cache = tmp_path / "cache"
    monkeypatch.setenv("SMOLFLOW_CACHE", str(cache))
    data = load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations"))
    entry = Path(tokenized_splits(tiny_ref, data, 64).path)
    old = time.time() - 3 * 86400  # the least recently used entry: the first to go
    for path in [*entry.iterdir(), entry]:
        os.utime(path, (old, old))

    proc = subprocess.run([sys.executable, "-c", EVICT_THEN_SIGTERM, str(tmp_path / "root")], cwd=ROOT,
                          env=_env(SMOLFLOW_CACHE=str(cache)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]  # ended by the SIGTERM, mid-eviction

    again = tokenized_splits(tiny_ref, data, 64)
    train, test = load_tokenized(again)  # without the fix: FileNotFoundError on a deleted .arrow
    assert len(train) and len(test)
    leftovers = [d for d in plan_cache(max_gb=None) if ".del" in d.name]
    assert leftovers and all(d.action == "delete" for d in leftovers), leftovers  # the next gc finishes it


# A tiny training (checkpoints at steps 2 and 4) that, once the final model is in the run folder, is
# SIGTERMed right after the work dir's newest checkpoint lost its weights (a cancel as training ends).
TRAIN_THEN_SIGTERM = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from tasks.leftovers import exit_on_termination
from tasks import training
from tasks.config import DataConfig, TrainingConfig
from tasks.data import load_chat_dataset
from tasks.models import resolve_model
from tasks.tokenization import tokenized_splits

published, place_dir, unlink = [], training.place_dir, os.unlink
def place_then_arm(src, dest, rel):  # the final model into the run folder: training is over
    done = place_dir(src, dest, rel)
    published.append(rel == "model")
    return done
def unlink_then_sigterm(path, *args, dir_fd=None, **kwargs):
    unlink(path, *args, dir_fd=dir_fd, **kwargs)
    folder = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.path.dirname(path)
    in_work_dir = folder.startswith(os.environ["SMOLFLOW_CACHE"]) and folder.endswith("/checkpoint-4")
    if any(published) and in_work_dir and os.path.basename(path) == "model.safetensors":
        os.kill(os.getpid(), signal.SIGTERM)
training.place_dir, os.unlink = place_then_arm, unlink_then_sigterm
exit_on_termination()
cfg = TrainingConfig.model_validate_json(sys.argv[3])
data = load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations"))
ref = resolve_model.fn(sys.argv[1])
training.train_sft.fn(ref, tokenized_splits(ref, data, cfg.max_length), cfg, sys.argv[2], [])
"""


def test_a_sigterm_while_training_drops_its_checkpoints_leaves_none_a_rerun_resumes_from(
        tiny_model_dir, tiny_ref, fixture_data, tmp_path, monkeypatch):
    """Training done, its model published: the work dir's checkpoints go. An rmtree cut off there
    left checkpoint-4 with its COMPLETE marker and without model.safetensors, and the flow run's
    Retry (same run id) resumed from it: "Can't find a valid checkpoint", on every retry."""
    from tasks.config import TrainingConfig
    from tasks.training import train_sft
    from tests.conftest import tokens_of

    cache = tmp_path / "cache"
    monkeypatch.setenv("SMOLFLOW_CACHE", str(cache))
    cfg = TrainingConfig(max_steps=4, save_steps=2, logging_steps=1, eval_steps=100, max_length=64)
    run_uri = str(tmp_path / "runs" / "r1")
    proc = subprocess.run([sys.executable, "-c", TRAIN_THEN_SIGTERM, str(tiny_model_dir), run_uri,
                           cfg.model_dump_json()], cwd=ROOT, env=_env(SMOLFLOW_CACHE=str(cache), WANDB_MODE="disabled"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]  # stopped in the deletion, not before it
    assert (Path(run_uri) / "model" / "model.safetensors").is_file()

    again = train_sft.fn(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, run_uri, [])
    assert again.metrics["steps"] == 4.0
