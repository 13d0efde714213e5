"""Training stage: supervised fine-tuning with TRL's SFTTrainer, eval loss on the test split.

Resumable: a retried task, or the flow re-run for the same run id, continues from the newest
complete checkpoint instead of step 0 (tasks/checkpoints.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
import posixpath
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks.checkpoints import (AlreadyAtMaxSteps, checkpoint_uploader, drop_unfinished, find_checkpoint,
                               remove_checkpoints, resume_key, step_of, stop_at_max_steps)
from tasks.config import TrainingConfig
from tasks.device import Placement, resolve
from tasks.leftovers import temp_dir
from tasks.parent_death import die_with_parent
from tasks.lora import head_without_bias, lora_config, new_token_rows
from tasks.locks import TRAINING_LOCK, exclusive
from tasks.models import ModelRef, fingerprint_dir, load_model, local_model_dir, resolve_source
from tasks.progress import training_progress
from tasks.run_ending import finishing
from tasks.caching import BY_CONTENT, CODE, ContentInputs
from tasks.runtime import cache_dir, disk_full, run_logger, retry_transient
from tasks.storage import ArtifactStore
from tasks.templates import added_token_ids
from tasks import train_levers
from tasks.tokenization import TokenizedRef, load_tokenized, tokenize_split
from tasks.transfer import locate_model, place_dir, release_work, run_root



class TrainResult(BaseModel):
    model: ModelRef
    metrics: dict[str, float]  # final train_loss, eval_loss, steps, runtime, resumed_from_step, ...
    log_history: list[dict]  # the Trainer's per-step logs: the loss curves
    trainer_args: dict = {}  # every TrainingArguments value as the Trainer ran (tokens masked by transformers)


# SFTConfig fields smolflow sets from its own settings: sft_args may not set them behind its back.
MANAGED = {name: f"training.{name}" for name in (
    "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "weight_decay", "optim", "logging_steps", "eval_steps", "save_steps", "max_length",
    "padding_free", "seed")} | {
    "warmup_steps": "training.warmup_ratio", "warmup_ratio": "training.warmup_ratio",
    # The strategies go with smolflow's every-N-steps settings: "no" would silently drop the checkpoints
    # (resume), the eval loss curve, or the loss curve the health check reads.
    "save_strategy": "training.save_steps (a checkpoint every N steps: a retried run resumes from it)",
    "eval_strategy": "training.eval_steps (eval loss on the test split every N steps)",
    "logging_strategy": "training.logging_steps (the loss curve, which the health check reads, every N steps)",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "activation_checkpointing": "training.gradient_checkpointing",
    "assistant_only_loss": "template.assistant_only_loss",
    "report_to": "wandb.mode",
    # smolflow starts the W&B run before the Trainer, whose callback then keeps that run's name
    "run_name": "output.run_id (the W&B run's name)",
    "push_to_hub": "output.push_to_hub", "hub_model_id": "output.push_to_hub",
    "hub_token": "output.hub_token_secret (or HF_TOKEN)", "hub_private_repo": "output.hub_private",
    "output_dir": "output.artifacts_uri (checkpoints go to the run folder)",
    "resume_from_checkpoint": "output.run_id (a re-run of the same run id resumes)",
}
# SFTConfig fields that act on raw text or on loading the model: smolflow loads the model and hands
# TRL conversations already templated and tokenized, so TRL would ignore them, or change the
# tokenizer's template or EOS after the data was tokenized with the old ones (and publish that).
NOT_APPLICABLE = {
    "chat_template_path": "use template.chat_template (the data is tokenized with it before training)",
    "eos_token": "the chat template decides EOS (template.chat_template); the data is tokenized with it before training",
    "pad_token": "smolflow sets the pad token when it loads the model",
    "save_only_model": "checkpoints would lack the optimizer and scheduler state a retried or re-run training "
                       "resumes from (the checkpoints are removed once the final model is saved anyway)",
    "completion_only_loss": "smolflow turns prompt/completion rows into a user and an assistant turn and tokenizes "
                            "them itself; for the loss on the completions only (TRL's default for such rows) set "
                            "template.assistant_only_loss: true",
    "dataset_text_field": "the data reaches TRL tokenized (data.dataset, template.chat_template)",
    "truncation_mode": "the data reaches TRL tokenized and cut to training.max_length",
    "model_init_kwargs": "smolflow loads the model (model, execution.precision)",
    # Its SIGTERM handler replaces the run's: Prefect would refuse to acknowledge a cancel (the run
    # ending Crashed), and a stop would checkpoint and train on instead of ending the run.
    "enable_jit_checkpoint": "a stopped or cancelled run ends 'stopped' and its re-run resumes from the last "
                             "checkpoint (training.save_steps)",
    "trust_remote_code": "smolflow loads the model (model)",
    # The Trainer pushes nothing (push_to_hub is smolflow's) and reports to W&B alone (report_to).
    **{name: "the Trainer pushes nothing; smolflow pushes the final merged model once (output.push_to_hub)"
       for name in ("hub_strategy", "hub_always_push", "hub_revision")},
    **{name: "only Trackio reads it, and smolflow reports to W&B (wandb.project)"
       for name in ("project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id")},
}


# SFTConfig fields TRL has renamed, as tutorials and older configs still spell them.
RENAMED = {"max_seq_length": "training.max_length (TRL renamed it)"}


def sft_overrides(cfg: TrainingConfig) -> dict:
    """training.sft_args checked against SFTConfig's fields and their types, values converted
    (ValueError naming `training.sft_args.<name>`)."""
    if not cfg.sft_args:
        return {}
    import dataclasses
    import typing

    from pydantic import TypeAdapter, ValidationError
    from trl import SFTConfig

    fields = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    hints = typing.get_type_hints(SFTConfig)
    out = {}
    for name, value in cfg.sft_args.items():
        where = f"training.sft_args.{name}"
        if name in MANAGED:
            raise ValueError(f"{where}: smolflow sets this SFTConfig field itself; use {MANAGED[name]} instead")
        if name in NOT_APPLICABLE:
            raise ValueError(f"{where}: would have no effect or undo smolflow's own: {NOT_APPLICABLE[name]}")
        if name not in fields:
            if name in RENAMED:
                raise ValueError(f"{where}: TRL's SFTConfig has no field {name!r} any more; use {RENAMED[name]}")
            close = [f for f in sorted(fields) if name.lower() in f or f in name.lower()][:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{where}: TRL's SFTConfig has no field {name!r}{hint}; see SFTConfig's documentation")
        try:
            out[name] = TypeAdapter(hints[name]).validate_python(value) if name in hints else value
        except ValidationError as err:
            kind = getattr(hints[name], "__name__", str(hints[name]))
            raise ValueError(f"{where}: {value!r} is not a valid {kind} ({err.errors()[0]['msg']})") from None
    if out.get("packing") and cfg.padding_free:
        raise ValueError("training.sft_args.packing: packs rows up to training.max_length, which padding-free batches "
                         "do without; set training.padding_free: false as well (or drop packing)")
    for kwargs in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        if kwargs in out and not cfg.gradient_checkpointing:  # the Trainer reads them only with checkpointing on
            raise ValueError(f"training.sft_args.{kwargs}: applies only with checkpointing, which is off; set "
                             "training.gradient_checkpointing: true as well (or drop it)")
    for beta in ("adam_beta1", "adam_beta2"):  # torch's optimizer refuses them only when training starts
        if beta in out and not 0 <= out[beta] < 1:
            raise ValueError(f"training.sft_args.{beta}: {out[beta]} is not in [0, 1)")
    if out.get("adam_epsilon", 0) < 0 or out.get("max_grad_norm", 0) < 0:
        raise ValueError("training.sft_args: adam_epsilon and max_grad_norm may not be negative")
    return out


def sft_config(cfg: TrainingConfig, output_dir: str, report_to: list[str], placement: Placement | None = None,
               **extra):
    """TRL's SFTConfig from smolflow's TrainingConfig, the run's placement (device, precision), then sft_args."""
    from trl import SFTConfig

    placement = placement or resolve()
    args = dict(
        output_dir=output_dir,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        logging_steps=cfg.logging_steps,
        logging_first_step=True,  # the learning-rate curve then shows the warm-up from its start
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
        # Constructor arguments: setting them on a built SFTConfig had no effect (identical losses).
        # bf16 is autocast over fp32 weights; tasks/device.py decides it per machine (CPUs differ).
        bf16=placement.precision == "bf16",
        use_cpu=placement.device == "cpu",
        report_to=report_to,
        disable_tqdm=True,  # Prefect's logs are the progress view; tqdm bars garble them
    ) | extra  # e.g. torch_compile, no evaluation or saving for scripts/bench_training.py
    # sft_args last: they may override the device defaults above (e.g. bf16 on a CPU with bf16 units).
    return SFTConfig(**(args | sft_overrides(cfg)))


def save_final(trainer, tokenizer, target: Path) -> None:
    """The trained model as a plain transformers model: LoRA adapters merged into the weights, so
    the run's model/ loads with AutoModelForCausalLM and scores, samples and pushes like any other."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = model.merge_and_unload()
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


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


@task(cache_policy=(ContentInputs() - "run_uri" - "report_to") + CODE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
def train_sft(
    base: ModelRef, tokens: TokenizedRef, cfg: TrainingConfig, run_uri: str, report_to: list[str],
) -> TrainResult:
    """Fine-tune the model on the tokenized conversations (resuming a crashed attempt) and upload the result."""
    # One training at a time per machine (and per Prefect server): nightly, on-demand and CLI runs.
    with exclusive(TRAINING_LOCK, f"training {posixpath.basename(run_uri)} (pid {os.getpid()})"):
        return _train_sft(base, tokens, cfg, run_uri, report_to)


def _train_sft(base: ModelRef, tokenized: TokenizedRef, cfg: TrainingConfig, run_uri: str,
               report_to: list[str]) -> TrainResult:
    # The cache key leaves out where the model is written and whether W&B watches, so a second
    # run with the same model, tokens and knobs reuses this result instead of training again.
    # The tokens are what tokenize_dataset saved (rendered with the run's template, cut to
    # max_length; with assistant-only loss they carry `assistant_masks`, from which TRL builds the
    # labels: SFTConfig's own assistant_only_loss flag stays off, since TRL accepts it only for
    # conversations it tokenizes itself).
    log = run_logger()
    run = ArtifactStore(run_uri)
    work = cache_dir("work", posixpath.basename(run_uri))
    key = resume_key(base, tokenized, cfg)
    resume = find_checkpoint(work, run, key)
    if resume is None:  # stale checkpoints of other settings must not be rotated in or resumed
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        remove_checkpoints(run)
    resumed_from = step_of(resume) if resume else 0
    log.info("Training from step %d%s on %d process(es)", resumed_from,
             f" (resuming {resume})" if resume else "", cfg.num_processes)
    spec = FitSpec(base=base, tokenized=tokenized, cfg=cfg, work=str(work), run_uri=run_uri, key=key,
                   resume=str(resume) if resume else None, report_to=report_to, placement=resolve())
    try:
        fitted = launch(spec) if cfg.num_processes > 1 else fit(spec)
    except BaseException as err:
        # torch says a full disk as "[enforce fail at inline_container.cc:...] . unexpected pos": name it
        full = disk_full(err, work) if isinstance(err, Exception) else None
        try:  # a save cut off is never resumed, and on a full disk it holds the next night's room
            with finishing():  # a stop raised again comes after it
                drop_unfinished(work, run)
        except Exception as also:  # never hides the training's own error
            log.warning("Unfinished checkpoints not removed: %s: %s", type(also).__name__, also)
        if full is not None:
            raise full from err
        raise
    final = work / "model"
    fingerprint = fingerprint_dir(final)
    uri, _ = place_dir(str(final), run, "model")  # a local root hard-links: no second copy of the weights
    # The work dir's too, markers first: release_work's plain rmtree, cut off by a cancel (SIGTERM) or a kill,
    # left a checkpoint marked complete without its weights, and a re-run of the run id resumed from it and failed.
    remove_checkpoints(run, work)  # the final model supersedes them; they are GBs on real models
    release_work(work, run, fingerprint)
    metrics = fitted["metrics"] | {"resumed_from_step": float(resumed_from)}
    log.info("Training done: %d steps in %.0f s, train loss %.4f, eval loss %.4f (all figures: training/metrics.json)",
             metrics.get("steps", 0), metrics.get("train_runtime_s", 0), metrics.get("train_loss", math.nan),
             metrics.get("eval_loss", math.nan))
    return TrainResult(
        model=ModelRef(source=f"tuned from {resolve_source(base.source)}" + (" (LoRA, merged)" if cfg.peft else ""),
                       path=uri, fingerprint=fingerprint),
        metrics=metrics,
        log_history=fitted["log_history"],
        trainer_args=fitted["trainer_args"],
    )


class FitSpec(BaseModel):
    """Everything one training process needs (also sent as JSON to torchrun's workers)."""

    base: ModelRef
    tokenized: TokenizedRef
    cfg: TrainingConfig
    work: str  # local folder: checkpoints/ and the final model/
    run_uri: str
    key: str  # resume key, written into each checkpoint's marker
    resume: str | None
    report_to: list[str]
    placement: Placement


def fit(spec: FitSpec) -> dict:
    """Train in this process (one DDP rank under torchrun); the final model goes to <work>/model."""
    from transformers import PrinterCallback
    from trl import SFTTrainer

    cfg = spec.cfg
    model, tokenizer = load_model(spec.base, as_stored=True)  # the Trainer places it (sft_config)
    train, test = load_tokenized(spec.tokenized)
    run, work = ArtifactStore(spec.run_uri), Path(spec.work)
    args = sft_config(cfg, str(work / "checkpoints"), spec.report_to, spec.placement)
    attention = model.config._attn_implementation
    levers = train_levers.apply(model, args.padding_free, "cpu" if args.use_cpu else spec.placement.device, args.bf16)
    added = added_token_ids(local_model_dir(spec.base)) if cfg.peft is not None else []
    if new_rows := new_token_rows(model, added):
        shown = ", ".join(f"{t!r} id {i}" for t, i in zip(tokenizer.convert_ids_to_tokens(added[:8]), added))
        run_logger().info("LoRA: also training the rows of the %d token(s) the chat template added (%s%s): LoRA "
                          "alone leaves them at their initial values, and the model would never learn to emit them",
                          len(added), shown, " ..." if len(added) > 8 else "")
    callbacks = [checkpoint_uploader(run, spec.key), training_progress(), stop_at_max_steps()]
    if trim := train_levers.trim_callback(levers["freed_memory_kept"]):
        callbacks.append(trim)
    if "wandb" in spec.report_to:  # a resumed training's W&B run gets the steps before the checkpoint too
        from tasks.tracking import resumed_curve

        callbacks.append(resumed_curve())
    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=test,
            processing_class=tokenizer,
            peft_config=lora_config(cfg, new_rows),
            callbacks=callbacks,
        )
    except ValueError as err:
        if cfg.peft is not None and "target" in str(err).lower():  # peft: a module name the model lacks
            raise ValueError(f"training.peft.target_modules={cfg.peft.target_modules}: {err}") from None
        raise
    if new_rows:
        head_without_bias(trainer.model)
    # The Trainer prints each log as a dict of strings; training_progress logs them as numbers.
    trainer.remove_callback(PrinterCallback)
    trainable = float(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))  # before a merge
    with train_levers.freed_memory_kept(levers["freed_memory_kept"]):
        try:
            train_output = trainer.train(resume_from_checkpoint=spec.resume)
        except AlreadyAtMaxSteps:  # resumed from the last step's checkpoint: its weights are the result
            train_output = nothing_left_to_train(trainer)
    last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last_eval is not None and last_eval.get("step") == trainer.state.global_step:
        eval_metrics = last_eval  # the Trainer just evaluated at the final step: not a second time
    else:
        eval_metrics = trainer.evaluate()
    model.config._attn_implementation = attention  # the saved model loads with transformers' own
    if trainer.is_world_process_zero():  # DDP: the main process writes the final model
        shutil.rmtree(work / "model", ignore_errors=True)
        save_final(trainer, tokenizer, work / "model")
    trainer.accelerator.wait_for_everyone()
    metrics = {
        "train_loss": whole_run_train_loss(trainer.state.log_history, step_of(Path(spec.resume)) if spec.resume else 0,
                                           train_output.training_loss, trainer.state.global_step),
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": math.exp(min(eval_metrics["eval_loss"], 50)),
        "steps": float(trainer.state.global_step),
        "train_runtime_s": train_output.metrics["train_runtime"],
        "train_samples_per_second": train_output.metrics["train_samples_per_second"],
        "num_processes": float(trainer.accelerator.num_processes),  # the world size that really ran
    }
    if cfg.peft is not None:
        metrics["trainable_params"] = trainable
    return {"metrics": metrics, "log_history": trainer.state.log_history,
            "trainer_args": json.loads(trainer.args.to_json_string()) | {"smolflow_levers": levers}
            # TRL's max_length is null with padding-free batches: smolflow cut the rows before TRL saw them
            | {"smolflow_rows_cut_to": cfg.max_length}
            | ({"smolflow_lora_new_tokens": {"tokens": tokenizer.convert_ids_to_tokens(added)} | new_rows}
               if new_rows else {})}


def nothing_left_to_train(trainer):
    """What trainer.train returns, for a resume whose checkpoint is already at max_steps (the
    Trainer has loaded its weights and state): no step ran in this attempt."""
    from transformers.trainer_utils import TrainOutput

    return TrainOutput(trainer.state.global_step, float("nan"), {"train_runtime": 0.0, "train_samples_per_second": 0.0})


def whole_run_train_loss(log_history: list[dict], resumed_from: int, loss_since: float, steps: int) -> float:
    """The mean training loss over every step, also for a resumed run, whose Trainer averages only
    the steps of its own attempt: the steps up to the resume from the losses logged there (each the
    mean of its logging window), the rest from the Trainer."""
    logged = sorted((h["step"], h["loss"]) for h in log_history if "loss" in h and h.get("step", 0) <= resumed_from)
    if resumed_from <= 0 or not logged:
        return loss_since
    total, previous = 0.0, 0
    for step, loss in logged:
        total, previous = total + loss * (step - previous), step
    before = total / previous
    if steps <= resumed_from:
        return before
    return (before * resumed_from + loss_since * (steps - resumed_from)) / steps


def train_or_reuse(base: ModelRef, tokens: TokenizedRef, cfg: TrainingConfig, run_uri: str,
                   report_to: list[str]) -> TrainResult:
    """train_sft, trained again when its cached result's model exists nowhere any more (retention
    deleted the run it was published in, and every run holding a copy)."""
    trained = train_sft(base, tokens, cfg, run_uri, report_to)
    if locate_model(trained.model, run_root(run_uri)) is None:
        run_logger().warning("The cached tuned model %s is gone (retention): training again", trained.model.path)
        trained = train_sft.with_options(refresh_cache=True)(base, tokens, cfg, run_uri, report_to)
    return trained


@task(cache_policy=BY_CONTENT, retries=3, retry_condition_fn=retry_transient, retry_delay_seconds=[2, 10, 30])
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


# ---- several processes: torchrun runs tasks/train_worker.py, which calls fit on each rank ----


def launch(spec: FitSpec) -> dict:
    """Run `fit(spec)` on spec.cfg.num_processes ranks; rank 0's metrics and log history."""
    import torch

    n = spec.cfg.num_processes
    with temp_dir("ddp") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(spec.model_dump_json(), encoding="utf-8")
        env = os.environ | {
            "SMOLFLOW_FIT_RESULT": str(result_path),
            # Each rank gets its share of the cores: oversubscribed threads made torch ~10x slower.
            "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // n)),
        }
        if spec.placement.device == "cuda":
            env.pop("OMP_NUM_THREADS")
        else:  # measured (scripts/bench_training.py, *-ddp2): 0.60-0.77x one process on all the cores
            run_logger().warning("training.num_processes=%d on the CPU: on one machine the gradients' all-reduce "
                                 "costs more than splitting the cores gains; 1 process is faster there", n)
        # --log-dir in our folder: by default torchrun makes a /tmp/torchelastic_* folder a launch and keeps it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               f"--log-dir={Path(tmp) / 'torchrun'}", "-m", "tasks.train_worker", str(spec_path)]
        run_logger().info("Training on %d processes: %s", n, " ".join(cmd))
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                              preexec_fn=functools.partial(die_with_parent, os.getpid()))
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"training on {n} processes failed (exit {proc.returncode}); last output:\n"
                               + proc.stdout[-4000:])
        return json.loads(result_path.read_text(encoding="utf-8"))
