"""Training stage: supervised fine-tuning with TRL's SFTTrainer, eval loss on the test split.

Resumable: every `save_steps` the Trainer's checkpoint (model, optimizer, scheduler, RNG, step)
is copied to `<run>/checkpoints/checkpoint-N/` and a `COMPLETE` marker is written last, so a
retried task, or the flow re-run for the same run id, continues from the newest complete
checkpoint instead of step 0. A checkpoint without the marker was cut off mid-save: ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import TASK_SOURCE
from pydantic import BaseModel

from tasks.config import TrainingConfig
from tasks.data import DatasetRef
from tasks.models import ModelRef, fingerprint_dir, load_model
from tasks.progress import training_progress
from tasks.runtime import BY_CONTENT, ContentInputs, cache_dir, run_logger
from tasks.storage import ArtifactStore
from tasks.tokenization import load_tokenized, tokenize_split, tokenized_splits
from tasks.transfer import locate_model, place_dir

MARKER = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class TrainResult(BaseModel):
    model: ModelRef
    metrics: dict[str, float]  # final train_loss, eval_loss, steps, runtime, resumed_from_step, ...
    log_history: list[dict]  # the Trainer's per-step logs: the loss curves


def sft_config(cfg: TrainingConfig, output_dir: str, report_to: list[str]):
    """TRL's SFTConfig from smolflow's TrainingConfig (the seed's knobs plus device defaults)."""
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=output_dir,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        logging_steps=cfg.logging_steps,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        # The data arrives tokenized and cut to max_length (tasks/tokenization.py). Padding-free
        # batches hold only real tokens, and TRL then refuses a max_length of its own.
        max_length=None if cfg.padding_free else cfg.max_length,
        padding_free=cfg.padding_free,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5 name; TRL defaults it on
        seed=cfg.seed,
        # TRL defaults to bf16, which CPUs without bf16 kernels run slowly or refuse.
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        report_to=report_to,
        disable_tqdm=True,  # Prefect's logs are the progress view; tqdm bars garble them
    )


def prepare_splits(splits, tokenizer, cfg: TrainingConfig, assistant_only_loss: bool = False):
    """(train, test) as the trainer takes them, in memory: token ids rendered with the chat template
    and cut to max_length (plus assistant_masks when assistant-only). train_sft uses the on-disk
    cache (tasks.tokenization.tokenized_splits) instead; this is for tests and benchmarks."""
    extra = ["n_tokens", "has_loss"] if assistant_only_loss else ["n_tokens"]
    return tuple(
        tokenize_split(splits[k], tokenizer, cfg.max_length, assistant_only_loss, split=k).remove_columns(extra)
        for k in ("train", "test")
    )


# ---- checkpoints: resume after a crash ----------------------------------------------------


def resume_key(base: ModelRef, data: DatasetRef, cfg: TrainingConfig, assistant_only_loss: bool = False) -> str:
    """What a checkpoint must have been trained from to be resumed: same model, data, loss mask and
    knobs (another max_steps would distort the LR schedule, so it starts afresh)."""
    what = {"model": base.fingerprint, "data": data.fingerprint, "cfg": cfg.model_dump(mode="json"),
            "assistant_only_loss": assistant_only_loss}
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
    mine = _steps(names, lambda n: (local / n / MARKER).is_file() and _marker_ok((local / n / MARKER).read_text(), key))
    if mine:
        return local / f"checkpoint-{mine[0]}"
    remote = run.child("checkpoints")
    files = remote.list_files()
    names = {f.split("/")[0] for f in files if "/" in f}
    done = {f.split("/")[0] for f in files if f.endswith("/" + MARKER)}
    for step in _steps(names, lambda n: n in done):
        name = f"checkpoint-{step}"
        with remote.fs.open(remote.child(name, MARKER).root, "r") as f:
            if not _marker_ok(f.read(), key):
                continue
        shutil.rmtree(local, ignore_errors=True)  # unfinished or foreign local saves: not to be rotated in
        return remote.download_dir(name, local / name)
    return None


def _remove(store: ArtifactStore) -> None:
    if store.exists():
        store.fs.rm(store.root, recursive=True)


def checkpoint_uploader(run: ArtifactStore, key: str, keep: int = 2):
    """A TrainerCallback that copies each saved checkpoint to the run folder, marker last."""
    from transformers import TrainerCallback

    class UploadCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            name = f"checkpoint-{state.global_step}"
            local = Path(args.output_dir) / name
            marker = json.dumps({"step": state.global_step, "key": key})
            remote = run.child("checkpoints")
            remote.upload_dir(local, name)  # every file the Trainer wrote (on_save comes after them)
            remote.write_text(f"{name}/{MARKER}", marker)  # then the marker, last
            (local / MARKER).write_text(marker)
            for old in _steps({f.split("/")[0] for f in remote.list_files() if "/" in f}, lambda n: True)[keep:]:
                _remove(remote.child(f"checkpoint-{old}"))
            run_logger().info("Checkpoint %s saved to %s", name, remote.url(name))

    return UploadCheckpoints()


@task(cache_policy=(ContentInputs() - "run_uri" - "report_to") + TASK_SOURCE, retries=1, retry_delay_seconds=10)
def train_sft(
    base: ModelRef, data: DatasetRef, cfg: TrainingConfig, run_uri: str, report_to: list[str],
    assistant_only_loss: bool = False,
) -> TrainResult:
    """Fine-tune the model on the chat dataset (resuming a crashed attempt) and upload the result."""
    # The cache key leaves out where the model is written and whether W&B watches, so a second
    # run with the same model, data and knobs reuses this result instead of training again.
    from trl import SFTTrainer

    log = run_logger()
    model, tokenizer = load_model(base)
    # Tokens come from the on-disk cache tokenize_dataset filled (made here if it is missing).
    # With assistant_only_loss they carry `assistant_masks`, from which TRL builds the labels;
    # SFTConfig's own assistant_only_loss flag stays off, since TRL accepts it only for
    # conversations it tokenizes itself.
    tokenized = tokenized_splits(base, data, cfg.max_length, assistant_only_loss)
    log.info("Tokenized data %s: %s", "reused" if tokenized.cached else "made", tokenized.path)
    train, test = load_tokenized(tokenized)
    run = ArtifactStore(run_uri)
    work = cache_dir("work", posixpath.basename(run_uri))
    key = resume_key(base, data, cfg, assistant_only_loss)
    resume = find_checkpoint(work, run, key)
    if resume is None:  # stale checkpoints of other settings must not be rotated in or resumed
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        _remove(run.child("checkpoints"))
    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, str(work / "checkpoints"), report_to),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        callbacks=[checkpoint_uploader(run, key), training_progress()],
    )
    resumed_from = int(_CHECKPOINT.match(resume.name)[1]) if resume else 0
    log.info("Training from step %d%s", resumed_from, f" (resuming {resume})" if resume else "")
    train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_metrics = trainer.evaluate()
    final = work / "model"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    fingerprint = fingerprint_dir(final)
    uri, _ = place_dir(str(final), run, "model")  # a local root hard-links: no second copy of the weights
    _remove(run.child("checkpoints"))  # the final model supersedes them; they are GBs on real models
    release_work(work, run, fingerprint)
    metrics = {
        "train_loss": train_output.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": math.exp(min(eval_metrics["eval_loss"], 50)),
        "steps": float(trainer.state.global_step),
        "resumed_from_step": float(resumed_from),
        "train_runtime_s": train_output.metrics["train_runtime"],
        "train_samples_per_second": train_output.metrics["train_samples_per_second"],
    }
    log.info("Training done: %s", metrics)
    return TrainResult(
        model=ModelRef(source=f"tuned from {base.source}", path=uri, fingerprint=fingerprint),
        metrics=metrics,
        log_history=trainer.state.log_history,
    )


def release_work(work: Path, run: ArtifactStore, fingerprint: str) -> None:
    """Training finished and its model is in the run folder: the local checkpoints (GBs on real
    models) go. The local model copy goes too on a local root (the run folder has the same inodes);
    on S3 it becomes the download cache's copy, which the stages that follow would fetch anyway."""
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    final, cached = work / "model", cache_dir("downloads") / fingerprint[:16]
    if run.is_s3 and not (cached / "config.json").exists():
        shutil.rmtree(cached, ignore_errors=True)
        final.rename(cached)
        os.utime(cached)  # just used: last in line for the cache bound
    shutil.rmtree(final, ignore_errors=True)


def run_root(run_uri: str) -> str:
    """<root> of a run folder <root>/runs/<run_id>."""
    return posixpath.dirname(posixpath.dirname(run_uri.rstrip("/")))


def train_or_reuse(base: ModelRef, data: DatasetRef, cfg: TrainingConfig, run_uri: str, report_to: list[str],
                   assistant_only_loss: bool = False) -> TrainResult:
    """train_sft, trained again when its cached result's model exists nowhere any more (retention
    deleted the run it was published in, and every run holding a copy)."""
    trained = train_sft(base, data, cfg, run_uri, report_to, assistant_only_loss=assistant_only_loss)
    if locate_model(trained.model, run_root(run_uri)) is None:
        run_logger().warning("The cached tuned model %s is gone (retention): training again", trained.model.path)
        trained = train_sft.with_options(refresh_cache=True)(base, data, cfg, run_uri, report_to,
                                                             assistant_only_loss=assistant_only_loss)
    return trained


@task(cache_policy=BY_CONTENT, retries=3, retry_delay_seconds=[2, 10, 30])
def publish_model(model: ModelRef, run_uri: str) -> ModelRef:
    """Make sure the run folder holds its model, also when training was reused from the cache."""
    target = ArtifactStore(run_uri).child("model")
    if model.path.rstrip("/") == target.uri:
        return model
    found = locate_model(model, run_root(run_uri))
    if found is None:
        raise FileNotFoundError(f"model {model.fingerprint[:16]} ({model.path}) exists in no retained run; "
                                "re-run with PREFECT_TASKS_REFRESH_CACHE=true to train it again")
    # Hard links on a local root, S3's server-side copy on S3: the bytes are not copied again.
    uri, how = place_dir(found.path, ArtifactStore(run_uri), "model")
    run_logger().info("Published %s into %s (%s)", found.path, uri, how)
    return model.model_copy(update={"path": uri})
