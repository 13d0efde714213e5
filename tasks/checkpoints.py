"""Resumable training: every `save_steps` the Trainer's checkpoint (model, optimizer, scheduler, RNG,
step) is copied to `<run>/checkpoints/checkpoint-N/` and a `COMPLETE` marker is written last, so a
retried task, or the flow re-run for the same run id, continues from the newest complete
checkpoint instead of step 0. A checkpoint without the marker was cut off mid-save: ignored; one
whose marker names other settings (another `resume_key`) is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from tasks.config import TrainingConfig
from tasks.models import ModelRef
from tasks.runtime import run_logger
from tasks.storage import ArtifactStore
from tasks.tokenization import TokenizedRef, content_digest
from tasks.transfer import place_dir

MARKER = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def resume_key(base: ModelRef, tokens: TokenizedRef, cfg: TrainingConfig) -> str:
    """What a checkpoint must have been trained from to be resumed: same model, tokens (data,
    template, max_length, loss mask) and knobs (another max_steps would distort the LR schedule,
    so it starts afresh). The tokens by content, not by their cache key: that key hashes the data
    and tokenizing code too, so after an upgrade touching either a re-run of a stopped run threw
    its checkpoints away and trained from step 0 on identical tokens."""
    what = {"model": base.fingerprint, "tokens": content_digest(tokens), "cfg": cfg.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _steps(names, is_complete) -> list[int]:
    return sorted((int(m[1]) for n in names if (m := _CHECKPOINT.match(n)) and is_complete(n)), reverse=True)


def _marker_ok(text: str, key: str) -> bool:
    try:
        return json.loads(text).get("key") == key
    except ValueError:
        return False


def find_checkpoint(work: Path, run: ArtifactStore, key: str) -> Path | None:
    """The newest complete checkpoint for this key: local work dir first, else the run folder's
    copy (downloaded into the work dir). None: start from step 0."""
    local = work / "checkpoints"
    names = [p.name for p in local.iterdir()] if local.is_dir() else []
    mine = _steps(names, lambda n: (local / n / MARKER).is_file() and _marker_ok((local / n / MARKER).read_text(encoding="utf-8"), key))
    if mine:
        return local / f"checkpoint-{mine[0]}"
    remote = run.child("checkpoints")
    files = remote.list_files()
    names = {f.split("/")[0] for f in files if "/" in f}
    done = {f.split("/")[0] for f in files if f.endswith("/" + MARKER)}
    foreign = []
    for step in _steps(names, lambda n: n in done):
        name = f"checkpoint-{step}"
        with remote.fs.open(remote.child(name, MARKER).root, "r", encoding="utf-8") as f:
            if not _marker_ok(f.read(), key):
                foreign.append(step)
                continue
        shutil.rmtree(local, ignore_errors=True)  # unfinished or foreign local saves: not to be rotated in
        return remote.download_dir(name, local / name)
    if foreign:  # the caller deletes them: say so, a stopped night's hours of training are at stake
        run_logger().warning(
            "Complete checkpoint(s) of this run at step(s) %s were trained from another model, other tokens or "
            "other training settings (or by a smolflow older than the tokens' content key): not resumed, "
            "deleted; training starts from step 0", foreign)
    return None


def _remove(store: ArtifactStore) -> None:
    if store.exists():
        store.fs.rm(store.root, recursive=True)


def remove_checkpoints(run: ArtifactStore, work: Path | None = None) -> None:
    """Delete the run folder's checkpoints (stale ones, or all once the final model is saved), and
    the work dir's too if given; markers first, so that a deletion cut off midway leaves nothing
    that looks like a complete checkpoint."""
    remote = run.child("checkpoints")
    for rel in remote.glob(f"*/{MARKER}"):
        remote.fs.rm(remote._path(rel))
    _remove(remote)
    if work is not None:
        for marker in work.glob(f"checkpoints/*/{MARKER}"):
            marker.unlink(missing_ok=True)
        shutil.rmtree(work / "checkpoints", ignore_errors=True)


def drop_unfinished(work: Path, run: ArtifactStore) -> None:
    """After a failed training: checkpoints without their marker (a save cut off by a full disk or
    an interrupt) are never resumed, yet hold what the failed save wrote (on a full disk, the room
    the next night needs); the complete ones stay, for a re-run of the run id."""
    local = work / "checkpoints"
    for folder in local.glob("checkpoint-*") if local.is_dir() else []:
        if _CHECKPOINT.match(folder.name) and not (folder / MARKER).is_file():
            shutil.rmtree(folder, ignore_errors=True)
    remote = run.child("checkpoints")
    files = remote.list_files()
    done = {f.split("/")[0] for f in files if f.endswith("/" + MARKER)}
    for name in {f.split("/")[0] for f in files if "/" in f} - done:
        if _CHECKPOINT.match(name):
            _remove(remote.child(name))


def step_of(checkpoint: Path) -> int:
    """The step a checkpoint folder (checkpoint-N) was saved at."""
    return int(_CHECKPOINT.match(checkpoint.name)[1])


def checkpoint_uploader(run: ArtifactStore, key: str, keep: int = 2):
    """A TrainerCallback that copies each saved checkpoint to the run folder, marker last."""
    from transformers import TrainerCallback

    class UploadCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # DDP: one uploader; the checkpoint folder is shared
                return
            name = f"checkpoint-{state.global_step}"
            local = Path(args.output_dir) / name
            marker = json.dumps({"step": state.global_step, "key": key})
            remote = run.child("checkpoints")
            # Every file the Trainer wrote (on_save comes after them); on a local root as hard links:
            # a checkpoint (weights and AdamW state, ~1.6 GB for 135M parameters) takes its room once.
            place_dir(str(local), remote, name)
            remote.write_text(f"{name}/{MARKER}", marker)  # then the marker, last
            (local / MARKER).write_text(marker, encoding="utf-8")
            for old in _steps({f.split("/")[0] for f in remote.list_files() if "/" in f}, lambda n: True)[keep:]:
                _remove(remote.child(f"checkpoint-{old}"))
            run_logger().info("Checkpoint %s saved to %s", name, remote.url(name))

    return UploadCheckpoints()


class AlreadyAtMaxSteps(Exception):
    """Raised by `stop_at_max_steps` before a step that max_steps does not allow."""


def stop_at_max_steps():
    """A TrainerCallback that ends training before a step past max_steps. transformers' Trainer
    resumed from a checkpoint saved at max_steps (a run stopped after its last save, or a retry after
    a failed upload) skips the batches already seen, then trains the epoch's next one before it
    checks max_steps: one step too many, at a learning rate the schedule never meant to reach."""
    from transformers import TrainerCallback

    class StopAtMaxSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise AlreadyAtMaxSteps(state.global_step)

    return StopAtMaxSteps()
