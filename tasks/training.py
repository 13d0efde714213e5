"""Training stage: supervised fine-tuning with TRL's SFTTrainer, eval loss on the test split."""

from __future__ import annotations

import logging
import math
import posixpath

from prefect import task
from prefect.cache_policies import TASK_SOURCE
from pydantic import BaseModel

from flows.config import TrainingConfig
from tasks.data import DatasetRef
from tasks.models import ModelRef, fingerprint_dir, load_model
from tasks.runtime import BY_CONTENT, ContentInputs, cache_dir
from tasks.storage import ArtifactStore

log = logging.getLogger(__name__)


class TrainResult(BaseModel):
    model: ModelRef
    metrics: dict[str, float]  # final train_loss, eval_loss, steps, runtime, ...
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
        max_length=cfg.max_length,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5 name; TRL defaults it on
        seed=cfg.seed,
        # TRL defaults to bf16, which CPUs without bf16 kernels run slowly or refuse.
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        report_to=report_to,
        disable_tqdm=True,  # Prefect's logs are the progress view; tqdm bars garble them
    )


@task(cache_policy=(ContentInputs() - "run_uri" - "report_to") + TASK_SOURCE, retries=1, retry_delay_seconds=10)
def train_sft(
    base: ModelRef, data: DatasetRef, cfg: TrainingConfig, run_uri: str, report_to: list[str]
) -> TrainResult:
    """Fine-tune the model on the chat dataset and upload the result to the run folder."""
    # The cache key leaves out where the model is written and whether W&B watches, so a second
    # run with the same model, data and knobs reuses this result instead of training again.
    from datasets import load_from_disk
    from trl import SFTTrainer

    model, tokenizer = load_model(base)
    splits = load_from_disk(data.path)
    work = cache_dir("work", posixpath.basename(run_uri))
    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, str(work / "checkpoints"), report_to),
        train_dataset=splits["train"],
        eval_dataset=splits["test"],
        processing_class=tokenizer,
    )
    train_output = trainer.train()
    eval_metrics = trainer.evaluate()
    final = work / "model"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    uri = ArtifactStore(run_uri).upload_dir(final, "model")
    metrics = {
        "train_loss": train_output.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": math.exp(min(eval_metrics["eval_loss"], 50)),
        "steps": float(trainer.state.global_step),
        "train_runtime_s": train_output.metrics["train_runtime"],
        "train_samples_per_second": train_output.metrics["train_samples_per_second"],
    }
    log.info("Training done: %s", metrics)
    return TrainResult(
        model=ModelRef(source=f"tuned from {base.source}", path=uri, fingerprint=fingerprint_dir(final)),
        metrics=metrics,
        log_history=trainer.state.log_history,
    )


@task(cache_policy=BY_CONTENT, retries=3, retry_delay_seconds=[2, 10, 30])
def publish_model(model: ModelRef, run_uri: str) -> ModelRef:
    """Make sure the run folder holds its model, also when training was reused from the cache."""
    from tasks.models import local_model_dir

    target = ArtifactStore(run_uri).child("model")
    if model.path.rstrip("/") == target.uri:
        return model
    uri = ArtifactStore(run_uri).upload_dir(local_model_dir(model), "model")
    return model.model_copy(update={"path": uri})
