"""The arena's configuration: which models battle, on which prompts, judged by whom, rated how.

Like RunConfig it is the flow's whole parameter set (the Prefect UI renders it as a form) and it
imports no task module. Files it names are read and checked at the flow's start, naming the field.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from tasks.config import DeviceConfig, WandbConfig
from tasks.config_base import JudgeEndpoint, Section, root_uri_problem, unused


class ArenaJudgeConfig(JudgeEndpoint):
    """Who judges the battles: the same backends as the fine-tune run's judge (tasks/judge.py)."""

    enabled: bool = Field(True, description="Judge scheduled battles (both orders each); off: people's votes only.")


class ArenaConfig(Section):
    """Blind battles between models (nightly runs, the base, any model id), a Bradley-Terry leaderboard."""

    artifacts_uri: str = Field(
        "./smolflow-runs", description="The fine-tune runs' root (local path, file:// or s3://): runs are read "
        "from runs/ and pointers/, the arena writes arena/ below it.")
    flow_name: str = Field("smolflow-finetune", description="Flow whose `promoted` pointer and runs are gathered.")
    base_model: str = Field(
        "auto", description="The anchor (rated 1000). 'auto': the base model recorded in the newest gathered run's "
        "manifest, or the fine-tune flow's default model when there is no run; or any model id or directory.")
    promoted: bool = Field(True, description="Include the run the `promoted` pointer names.")
    last_runs: int = Field(3, ge=0, description="Include the newest N completed runs (by completion time).")
    models: list[str] = Field(
        default_factory=list, description="More models: hub ids, local model directories, or "
        "'builtin:smollm2-135m-instruct'.")
    prompts: str = Field(
        "fixture", description="'fixture': the shipped AlpacaEval-schema instructions "
        "(tasks/fixtures/judge/instructions.jsonl); or a local .json/.jsonl file with `instruction` per row.")
    limit: int | None = Field(None, ge=1, description="Use at most this many prompts.")
    max_new_tokens: int = Field(100, ge=1, le=4096, description="Answer length; answers are cached per model "
                                "content, prompt and this length.")
    max_battles: int | None = Field(
        None, ge=1, description="Judge at most this many battles, the most informative (closest ratings, fewest "
        "battles so far) first; None: every pair on every prompt.")
    judge: ArenaJudgeConfig = Field(default_factory=ArenaJudgeConfig, description="Who judges the battles.")
    human_votes: bool = Field(True, description="Count people's votes from the arena page (arena/votes/).")
    bootstrap_rounds: int = Field(200, ge=20, le=10000, description="Bootstrap resamples for the 95% intervals.")
    seed: int = Field(0, description="Seed of the bootstrap (the same battles give the same intervals).")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases: the leaderboard table.")
    execution: DeviceConfig = Field(
        default_factory=DeviceConfig, description="Where the contestants and a local judge run, and in which "
        "precision (as a fine-tune's).")
    torch_threads: int | None = Field(
        None, ge=1, description="None: every available core; lower it when other heavy processes share the machine.")

    @model_validator(mode="after")
    def _checks(self) -> ArenaConfig:
        root_uri_problem(self.artifacts_uri, "artifacts_uri: ")
        if "/" in self.flow_name or not self.flow_name:
            raise ValueError(f"flow_name {self.flow_name!r} must be a non-empty name without slashes")
        unused(self.wandb, ("log_model",), "wandb.", "the arena trains no model, so there is none to upload")
        return self
