"""What continues after a crash: a Prefect retry of the training task resumes from the attempt's
last checkpoint, and a re-run after SIGKILL continues the same W&B run in one offline folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from tasks import training
from tasks.config import TrainingConfig, WandbConfig
from tasks.storage import ArtifactStore
from tasks.tracking import finish_run, fold_in_earlier_attempts, start_wandb
from tasks.checkpoints import MARKER
from tasks.training import train_sft
from tests.conftest import tokens_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
import sys, threading, torch
from pathlib import Path
from transformers import TrainerCallback
torch.set_num_threads(1)
from tasks import training
from tasks.config import DataConfig, TrainingConfig, WandbConfig
from tasks.data import load_chat_dataset
from tasks.models import resolve_model
from tasks.tracking import start_wandb
from tasks.tokenization import tokenized_splits
model, run_uri, cfg, wandb_dir, held = sys.argv[1], sys.argv[2], TrainingConfig.model_validate_json(sys.argv[3]), sys.argv[4], sys.argv[5]

class HoldAfterStep8(TrainerCallback):
    # Steps 7 and 8 logged (the W&B callback runs before this one), checkpoint-6 the newest: the state
    # a crash between two checkpoints leaves. Held here until the test kills this process.
    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == 8 and "loss" in logs:
            Path(held).write_text("8")
            threading.Event().wait()

training.training_progress = HoldAfterStep8
start_wandb(WandbConfig(mode="offline"), "same-run", {}, Path(wandb_dir), None)
data = load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations"))
ref = resolve_model.fn(model)
training.train_sft.fn(ref, tokenized_splits(ref, data, cfg.max_length), cfg, run_uri, ["wandb"])
"""


def _wandb_records(offline_dir: Path) -> list[dict]:
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(offline_dir)],
                         capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip().startswith("{")]


def _offline_dir(wandb_dir: Path) -> Path:
    """The killed process's offline run folder (a path to nothing before W&B has created it)."""
    folders = [f.parent for f in wandb_dir.glob("wandb/offline-run-*/run-*.wandb")]
    assert len(folders) <= 1, folders
    return folders[0] if folders else wandb_dir / "not-created-yet"


def _train_rows(records: list[dict]) -> list[dict]:
    """The history rows the Trainer logged a training loss in, in the order W&B recorded them."""
    return [r["history"]["item"] for r in records if r["type"] == "history" and "train/loss" in r["history"]["item"]]


def _logged_global_steps(records: list[dict]) -> list[int]:
    return [int(row["train/global_step"]) for row in _train_rows(records)]


@pytest.mark.slow
def test_rerun_after_sigkill_continues_the_same_wandb_run(tiny_ref, fixture_data, tmp_path):
    cfg = TrainingConfig(max_steps=12, save_steps=3, logging_steps=1, eval_steps=12, max_length=128, seed=11)
    run = ArtifactStore(str(tmp_path / "runs" / "same-run"))
    wandb_dir, held = tmp_path / "wandb-local", tmp_path / "held-at-step"
    # A process of its own, like a crashed flow run: not attached to this one's W&B service (which an
    # earlier test may have started and exported as WANDB_SERVICE). W&B writes its transaction log
    # every 15 s by default; every second here, so the killed attempt's rows are on disk sooner.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {
        "PYTHONPATH": str(ROOT), "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN_WITH_WANDB, tiny_ref.path, run.uri, cfg.model_dump_json(), str(wandb_dir),
         str(held)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    # Kill only once the state a crash between checkpoints leaves is observable: checkpoint-6 complete
    # (run folder and work dir), and steps 1-8 in the killed process's W&B file, so steps 7 and 8
    # are logged by both attempts.
    deadline = time.monotonic() + 600
    while not (held.is_file() and 8 in _logged_global_steps(_wandb_records(_offline_dir(wandb_dir)))):
        assert proc.poll() is None and time.monotonic() < deadline, "training never held at step 8 with its rows on disk"
        time.sleep(0.5)
    local_marker = Path(os.environ["SMOLFLOW_CACHE"]) / "work" / "same-run" / "checkpoints" / "checkpoint-6" / MARKER
    assert run.exists(f"checkpoints/checkpoint-6/{MARKER}") and local_marker.is_file()
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"training ended on its own before the kill:\n{err.decode()[-2000:]}"
    killed = _offline_dir(wandb_dir)
    assert _logged_global_steps(_wandb_records(killed)) == list(range(1, 9))

    # The flow re-run for the same run id: same W&B id, training resumes from the checkpoint, and
    # the flow's W&B ending (finish_wandb) folds the killed attempt's folder in.
    wb = start_wandb(WandbConfig(mode="offline"), "same-run", {}, wandb_dir, None)
    result = train_sft.fn(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, run.uri, ["wandb"])
    finish_run(wb, fold_in_earlier_attempts(wb, result.log_history))
    assert result.metrics["resumed_from_step"] == 6 and result.metrics["steps"] == cfg.max_steps

    # One W&B run folder, the re-run's, holding the whole run.
    [folder] = (wandb_dir / "wandb").glob("offline-run-*")
    assert folder != killed and not killed.exists()
    records = _wandb_records(folder)
    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["run_id"] == "same-run" and run_record["resume"] is True
    # Every step once, in order: 1-6 logged again from checkpoint-6 before training went on; 7 and 8,
    # which both attempts logged, only as the re-run took them (the steps the final model took).
    assert _logged_global_steps(records) == list(range(1, cfg.max_steps + 1))
    trainer_curve = [(h["step"], h["loss"]) for h in result.log_history if "loss" in h]
    assert [(int(r["train/global_step"]), r["train/loss"]) for r in _train_rows(records)] == trainer_curve
    # The killed attempt's console log travels in the run's files.
    assert (folder / "files" / "earlier-attempts" / killed.name / "output.log").is_file()


def test_a_rerun_that_reuses_its_training_folds_two_earlier_attempts_into_one_wandb_folder(tmp_path):
    # Two earlier attempts of one run id, each with files of its own; the third reuses the training
    # that the second finished before it crashed, so only the cached log history holds the curve.
    wandb_dir, wb = tmp_path / "wandb-local", None
    for attempt in ("first", "second"):
        wb = start_wandb(WandbConfig(mode="offline"), "twice", {}, wandb_dir, None)
        (Path(wb.dir) / "smolflow").mkdir()
        (Path(wb.dir) / "smolflow" / "report.md").write_text(attempt)
        (Path(wb.dir) / "smolflow" / f"{attempt}.md").write_text(attempt)
        wb.save(str(Path(wb.dir) / "smolflow" / "report.md"), base_path=wb.dir, policy="now")
        wb.finish()
    # Another run whose id looks like W&B's same-second suffix (`-1`): its folder is not an earlier attempt.
    other = start_wandb(WandbConfig(mode="offline"), "twice-1", {}, wandb_dir, None)
    other.finish()
    earlier = sorted((wandb_dir / "wandb").glob("offline-run-*-twice*"))
    log_history = [{"loss": 2.0 - s / 10, "learning_rate": 1e-4, "epoch": s / 4, "step": s} for s in range(1, 5)] + [
        {"eval_loss": 1.5, "epoch": 1.0, "step": 4}, {"train_runtime": 9.0, "train_loss": 1.75, "epoch": 1.0, "step": 4}]

    wb = start_wandb(WandbConfig(mode="offline"), "twice", {}, wandb_dir, None)
    folded = fold_in_earlier_attempts(wb, log_history)
    assert [f.name for f in folded] == [f.name for f in earlier if (f / "run-twice.wandb").is_file()]
    assert len(folded) == 2
    finish_run(wb, folded)

    left = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert left == sorted([Path(wb.dir).parent, Path(other.dir).parent])  # the other id's folder is not touched
    records = _wandb_records(Path(wb.dir).parent)
    assert [(int(r["train/global_step"]), r["train/loss"]) for r in _train_rows(records)] == [
        (h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [r["history"]["item"] for r in records if r["type"] == "history" and "eval/loss" in r["history"]["item"]]
    assert [(e["train/global_step"], e["eval/loss"]) for e in evals] == [(4, 1.5)]
    files = Path(wb.dir) / "smolflow"
    # Of two earlier copies the newer is kept; each attempt's own file travels.
    assert (files / "report.md").read_text() == "second"
    assert (files / "first.md").read_text() == "first" and (files / "second.md").read_text() == "second"
