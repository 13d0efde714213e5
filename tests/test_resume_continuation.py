"""What continues after a crash: a Prefect retry of the training task resumes from the attempt's
last checkpoint, and a re-run after SIGKILL keeps logging into the same W&B run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from tasks.config import TrainingConfig, WandbConfig
from tasks import training
from tasks.storage import ArtifactStore
from tasks.tracking import start_wandb
from tasks.training import MARKER, train_sft
from tests.conftest import tokens_of

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_retry_of_the_training_task_resumes_from_the_failed_attempts_checkpoint(
    tiny_ref, fixture_data, tmp_path, monkeypatch
):
    # A transient failure (e.g. a lost connection) at step 7, once; checkpoints are taken every 3 steps.
    failed = []

    class FailOnceAtStep7(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7 and not failed:
                failed.append(state.global_step)
                raise ConnectionError("transient failure at step 7")

    monkeypatch.setattr(training, "training_progress", FailOnceAtStep7)
    cfg = TrainingConfig(max_steps=10, save_steps=3, logging_steps=1, eval_steps=10, max_length=128, seed=7)
    run = ArtifactStore(str(tmp_path / "runs" / "retry-1"))

    result = train_sft.with_options(retry_delay_seconds=0)(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, run.uri, [])

    assert failed == [7], "the first attempt must have failed"
    assert result.metrics["resumed_from_step"] == 6  # the newest complete checkpoint before the failure
    assert result.metrics["steps"] == cfg.max_steps
    assert [h["step"] for h in result.log_history if "loss" in h] == list(range(1, cfg.max_steps + 1))


TRAIN_WITH_WANDB = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from tasks.config import DataConfig, TrainingConfig, WandbConfig
from tasks.data import load_chat_dataset
from tasks.models import resolve_model
from tasks.tracking import start_wandb
from tasks.training import train_sft
from tasks.tokenization import tokenized_splits
model, run_uri, cfg, wandb_dir = sys.argv[1], sys.argv[2], TrainingConfig.model_validate_json(sys.argv[3]), sys.argv[4]
start_wandb(WandbConfig(mode="offline"), "same-run", {}, Path(wandb_dir), None)
data = load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations"))
ref = resolve_model.fn(model)
train_sft.fn(ref, tokenized_splits(ref, data, cfg.max_length), cfg, run_uri, ["wandb"])
"""


def _wandb_records(offline_dir: Path) -> list[dict]:
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(offline_dir)],
                         capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip().startswith("{")]


def _has_run_record(wandb_dir: Path) -> bool:
    files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    return bool(files) and any(r["type"] == "run" for r in _wandb_records(files[0].parent))


def _logged_global_steps(records: list[dict]) -> list[int]:
    steps = []
    for r in records:
        if r["type"] == "history" and "train/loss" in r["history"]["item"]:
            steps.append(int(r["history"]["item"]["train/global_step"]))
    return steps


def test_rerun_after_sigkill_continues_the_same_wandb_run(tiny_ref, fixture_data, tmp_path):
    cfg = TrainingConfig(max_steps=12, save_steps=3, logging_steps=1, eval_steps=12, max_length=128, seed=11)
    run = ArtifactStore(str(tmp_path / "runs" / "same-run"))
    wandb_dir = tmp_path / "wandb-local"
    # A process of its own, like a crashed flow run: not attached to this one's W&B service (which an
    # earlier test may have started and exported as WANDB_SERVICE).
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN_WITH_WANDB, tiny_ref.path, run.uri, cfg.model_dump_json(), str(wandb_dir)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    # Kill only once both things a crash must leave are observable: a complete checkpoint, and the
    # W&B run record in the killed process's offline file (killing earlier left a folder without one).
    # The run record comes first (wandb.init runs before training), then the checkpoint.
    deadline = time.monotonic() + 600
    while not _has_run_record(wandb_dir):
        assert proc.poll() is None and time.monotonic() < deadline, "no W&B run record on disk in time"
        time.sleep(0.5)
    # on_save writes the run folder's marker, then the work dir's: wait for the last one, or the
    # re-run finds an unmarked local checkpoint-6 and resumes from checkpoint-3.
    local_marker = Path(os.environ["SMOLFLOW_CACHE"]) / "work" / "same-run" / "checkpoints" / "checkpoint-6" / MARKER
    while not (run.exists(f"checkpoints/checkpoint-6/{MARKER}") and local_marker.is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, "no complete checkpoint-6 in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"training ended on its own before the kill:\n{err.decode()[-2000:]}"

    # The flow re-run for the same run id: same W&B id, training resumes from the checkpoint.
    wb = start_wandb(WandbConfig(mode="offline"), "same-run", {}, wandb_dir, None)
    result = train_sft.fn(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, run.uri, ["wandb"])
    wb.finish()
    resumed_at = int(result.metrics["resumed_from_step"])
    assert resumed_at >= 6 and result.metrics["steps"] == cfg.max_steps

    killed, rerun = sorted((wandb_dir / "wandb").glob("offline-run-*"))  # one folder per process, in time order
    for folder in (killed, rerun):
        run_record = next(r["run"] for r in _wandb_records(folder) if r["type"] == "run")
        # Same id, resume allowed: `wandb sync` (or the online run) appends both to one W&B run.
        assert run_record["run_id"] == "same-run" and run_record["resume"] is True
    rerun_steps = _logged_global_steps(_wandb_records(rerun))
    # The re-run logs only the steps it trained, numbered on from the checkpoint, not from 0.
    assert rerun_steps == list(range(resumed_at + 1, cfg.max_steps + 1))
