"""Resume after a crash: a training process killed with SIGKILL continues from its newest
complete checkpoint; half-written checkpoints and those of other settings are ignored."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.config import TrainingConfig
from tasks.storage import ArtifactStore
from tasks.checkpoints import MARKER, find_checkpoint, resume_key
from tasks.training import train_sft
from tests.conftest import tokens_of

ROOT = Path(__file__).resolve().parents[1]
TRAIN = """
import sys, torch
torch.set_num_threads(1)
from tasks.config import DataConfig, TrainingConfig
from tasks.data import load_chat_dataset
from tasks.models import resolve_model
from tasks.training import train_sft
from tasks.tokenization import tokenized_splits
cfg = TrainingConfig.model_validate_json(sys.argv[3])
data = load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations"))
ref = resolve_model.fn(sys.argv[1])
train_sft.fn(ref, tokenized_splits(ref, data, cfg.max_length), cfg, sys.argv[2], [])
"""


def complete_steps(run: ArtifactStore) -> list[int]:
    files = run.list_files("checkpoints")
    return sorted(int(f.split("/")[0].split("-")[1]) for f in files if f.endswith("/" + MARKER))


@pytest.mark.slow
def test_sigkilled_training_resumes_from_the_newest_complete_checkpoint(tiny_ref, fixture_data, tmp_path, monkeypatch):
    cfg = TrainingConfig(max_steps=12, save_steps=3, logging_steps=1, eval_steps=12, max_length=128)
    run = ArtifactStore(str(tmp_path / "artifacts" / "runs" / "crash-1"))
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, tiny_ref.path, run.uri, cfg.model_dump_json()],
                            cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not complete_steps(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"training ended on its own before the kill:\n{err.decode()[-2000:]}"
    assert not run.exists("model"), "the killed run must not have finished"
    done = complete_steps(run)
    assert done and max(done) < cfg.max_steps
    # On a local root the run folder's copy of a checkpoint shares the work dir's blocks (hard links),
    # so a checkpoint (GBs on a real model) takes its room once, not twice.
    newest = f"checkpoints/checkpoint-{max(done)}/model.safetensors"
    work = Path(os.environ["SMOLFLOW_CACHE"]) / "work" / "crash-1" / newest
    assert (Path(run.root) / newest).stat().st_ino == work.stat().st_ino

    # A save cut off mid-way: files but no marker, at a later step. It must be ignored.
    run.write_bytes(f"checkpoints/checkpoint-{max(done) + 1}/model.safetensors", b"half-written")
    # Another machine (empty local cache) re-runs the same run id: it resumes from the run folder.
    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "other-machine-cache"))
    result = train_sft.fn(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, run.uri, [])

    assert result.metrics["resumed_from_step"] == max(done)
    assert result.metrics["steps"] == cfg.max_steps
    # The Trainer restored its log history: one train-loss row per step, before and after the kill.
    steps = [h["step"] for h in result.log_history if "loss" in h]
    assert steps == list(range(1, cfg.max_steps + 1))
    # The train loss is the mean over all steps, not over those after the resume only.
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert result.metrics["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert run.exists("model/model.safetensors")
    assert not run.exists("checkpoints"), "checkpoints are removed once the final model is saved"


def _fake_checkpoint(run: ArtifactStore, step: int, marker: str | None) -> None:
    run.write_text(f"checkpoints/checkpoint-{step}/trainer_state.json", json.dumps({"global_step": step}))
    if marker is not None:
        run.write_text(f"checkpoints/checkpoint-{step}/{MARKER}", marker)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_find_checkpoint_skips_unmarked_and_foreign_checkpoints(where, tiny_ref, fixture_data, tmp_path, request):
    root = str(tmp_path / "artifacts") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/smolflow"
    run = ArtifactStore(root).child("runs", f"find-{where}")
    cfg = TrainingConfig(max_steps=10)
    key = resume_key(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg)
    other = resume_key(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), TrainingConfig(max_steps=20))
    work = tmp_path / "work"
    assert find_checkpoint(work, run, key) is None  # nothing saved yet: start at step 0

    _fake_checkpoint(run, 4, json.dumps({"step": 4, "key": key}))
    _fake_checkpoint(run, 6, json.dumps({"step": 6, "key": other}))  # other settings (max_steps)
    _fake_checkpoint(run, 8, None)  # half-written
    found = find_checkpoint(work, run, key)
    assert found == work / "checkpoints" / "checkpoint-4"
    assert json.loads((found / "trainer_state.json").read_text())["global_step"] == 4

    # A complete local checkpoint wins over the run folder (a Prefect retry on the same machine).
    local = work / "checkpoints" / "checkpoint-5"
    local.mkdir(parents=True)
    (local / MARKER).write_text(json.dumps({"step": 5, "key": key}))
    assert find_checkpoint(work, run, key) == local


def test_a_retry_after_the_last_checkpoint_trains_no_step_past_max_steps(tiny_ref, fixture_data, tmp_path, monkeypatch):
    """Every step and its last checkpoint done, then the model's upload fails (a storage error,
    retried by Prefect): the retry resumes at max_steps and must not train a step more. The
    constant schedule makes an extra step change the weights."""
    import tasks.training as training
    from safetensors.torch import load_file

    cfg = TrainingConfig(max_steps=6, save_steps=3, logging_steps=1, eval_steps=3, max_length=128,
                         lr_scheduler_type="constant", warmup_ratio=0.0)
    run = ArtifactStore(str(tmp_path / "artifacts" / "runs" / "retry-1"))
    tokens = tokens_of(tiny_ref, fixture_data, cfg)
    place_dir, failed = training.place_dir, []

    def upload_fails_once(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise OSError("connection reset while uploading the model")
        return place_dir(*args, **kwargs)

    monkeypatch.setattr(training, "place_dir", upload_fails_once)
    with pytest.raises(OSError, match="connection reset"):
        train_sft.fn(tiny_ref, tokens, cfg, run.uri, [])
    assert complete_steps(run) == [3, 6]
    work = Path(os.environ["SMOLFLOW_CACHE"]) / "work" / "retry-1" / "checkpoints" / "checkpoint-6"
    last = load_file(str(work / "model.safetensors"))

    result = train_sft.fn(tiny_ref, tokens, cfg, run.uri, [])
    assert result.metrics["resumed_from_step"] == 6
    assert result.metrics["steps"] == 6
    assert [h["step"] for h in result.log_history if "loss" in h] == list(range(1, 7))
    assert [h["step"] for h in result.log_history if "eval_loss" in h] == [3, 6]
    final = load_file(str(Path(result.model.path) / "model.safetensors"))
    assert final.keys() == last.keys() and all(final[k].equal(last[k]) for k in last)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert result.metrics["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


@pytest.fixture
def small_disk(tmp_path):
    """A real 60 MiB file system (tmpfs; needs root): room for one checkpoint of the tiny model, not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_named_and_leaves_no_half_written_checkpoint(tiny_ref, fixture_data, small_disk, monkeypatch):
    """The disk fills while the Trainer saves its second checkpoint. torch's writer said only
    "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...", the run's status
    and `smolflow runs` with it, and the cut-off checkpoint (no marker: never resumed) kept what it
    had written, the room the next night needed. Now: ENOSPC, the folder and the room left; the
    complete checkpoint stays for a re-run of the run id, the cut-off one goes."""
    import errno

    monkeypatch.setenv("SMOLFLOW_CACHE", str(small_disk / "cache"))
    cfg = TrainingConfig(max_steps=4, save_steps=2, logging_steps=1, eval_steps=4, max_length=128)
    run = ArtifactStore(str(small_disk / "artifacts" / "runs" / "full-1"))
    with pytest.raises(OSError) as failed:
        train_sft.fn(tiny_ref, tokens_of(tiny_ref, fixture_data, cfg), cfg, run.uri, [])
    work = small_disk / "cache" / "work" / "full-1"
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(work), failed.value
    assert "No space left on device (" in str(failed.value) and "MB free there" in str(failed.value)
    assert sorted(p.name for p in (work / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert (work / "checkpoints" / "checkpoint-2" / MARKER).is_file()
    assert complete_steps(run) == [2] and sorted(run.list_files("checkpoints"))[0].startswith("checkpoint-2/")
    assert os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize > 12 * 2**20  # what the cut-off save held


def test_a_full_disk_under_an_atomic_write_names_the_folder(small_disk):
    """Python's write() says only "[Errno 28] No space left on device": status.json, the manifest and
    every run-folder file failed so on a full disk, naming no folder."""
    import errno

    from tasks.runtime import atomic_write

    (small_disk / "filler").write_bytes(b"\0" * (59 * 2**20))
    with pytest.raises(OSError) as failed:
        atomic_write(small_disk / "run" / "manifest.json", b"x" * (4 * 2**20))
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(small_disk / "run"), failed.value
    assert "MB free there" in str(failed.value) and not list((small_disk / "run").iterdir())


def test_low_room_names_a_full_disk_only_for_a_writers_failure(small_disk):
    """Under 64 MiB free, any training failure was reported as "No space left on device" (a shape
    error too): low room explains a failed write (torch's writer never says why), not other errors."""
    from tasks.runtime import disk_full

    torch_writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2048 vs 1987")
    assert "MB free there" in str(disk_full(torch_writer, small_disk))
    assert "MB free there" in str(disk_full(OSError(5, "Input/output error"), small_disk))
    assert disk_full(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)"), small_disk) is None
    assert disk_full(ValueError("bad value"), small_disk) is None
    assert disk_full(ValueError("x"), Path("/")) is None  # room to spare: nothing says full


def test_a_copy_into_a_run_folder_cut_off_leaves_no_staging_file(small_disk, tmp_path):
    """A model file copied into a run folder on another file system, cut off (here: the disk fills;
    a stop signal alike) left `<name>.tmp<pid>` there, which a re-run's manifest listed as a file of
    the run and publishing copied along. And it said "[Errno 28] No space left on device: 'src' ->
    'dest.tmp123'": now the folder, the room left and what to do, as every other full write."""
    import errno

    from tasks.transfer import link_or_copy_file

    big = tmp_path / "model.safetensors"
    big.write_bytes(b"\0" * (70 * 2**20))  # more than the 60 MiB disk holds: the copy fails midway
    with pytest.raises(OSError) as failed:
        link_or_copy_file(big, small_disk / "run" / "model" / "model.safetensors")
    assert list((small_disk / "run" / "model").iterdir()) == []
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(small_disk / "run" / "model")
    assert "MB free there" in str(failed.value) and "Free space on that file system" in str(failed.value)
