"""What every section of the run configuration shares: unknown keys and true/false for a number are
refused, and so are settings that would have no effect (a setting is never silently ignored)."""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class Section(BaseModel):
    # Reject unknown keys: a typo in a YAML file or the UI's JSON must not be silently ignored.
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1: `tolerance: yes` would allow any drop, `max_train_rows: on` one row.
        if isinstance(value, bool) and info.field_name:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation) or (annotation,))
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"needs a number, got {str(value).lower()}")
        return value


class ConfigError(ValueError):
    """A setting that names something that does not exist; the message names the field."""


def unused(section: BaseModel, names: tuple[str, ...], prefix: str, why: str) -> None:
    """Refuse (ValueError naming them) settings among `names` moved off their defaults that would
    have no effect, `why` saying when they apply: a setting is never silently ignored."""
    fields = type(section).model_fields
    moved = [n for n in names if getattr(section, n) != fields[n].get_default(call_default_factory=True)]
    if moved:
        raise ValueError(f"{', '.join(prefix + n for n in moved)}: {why}; remove {'them' if len(moved) > 1 else 'it'}")


# The judge sends its key to base_url, and both come from the run's settings, which anyone who can
# start a run (the Prefect UI's Run button) writes: so a setting may pick a judge key, never another
# service's credential (AWS_SECRET_ACCESS_KEY, HF_TOKEN, WANDB_API_KEY, the hub token's Secret block).
JUDGE_KEY_ENV = re.compile(r"[A-Z][A-Z0-9_]*_API_KEY")
NOT_JUDGE_KEYS = {"WANDB_API_KEY", "PREFECT_API_KEY"}
JUDGE_KEY_BLOCK = re.compile(r"[a-z0-9-]*api-key")
QUERY_SECRETS = re.compile(r"key|token|secret|sig|passw|auth", re.I)  # URL query names that carry credentials


def root_uri_problem(uri: str, prefix: str = "") -> None:
    """An artifact root smolflow can use (ValueError, after `prefix`): a local path, file:// or
    s3://, without credentials in it."""
    if "://" in uri and not uri.startswith(("file://", "s3://")):
        raise ValueError(f"{prefix}unsupported scheme in {uri!r}: use a local path, file:// or s3://")
    # s3://KEY:SECRET@bucket: S3 takes no credentials from the URI (the bucket would be named
    # "KEY:SECRET@bucket"), and the setting is recorded (config.json, report, W&B, the served
    # deployments' parameters in Prefect's UI). The value is not echoed: it holds the secret.
    if uri.startswith("s3://") and "@" in uri.removeprefix("s3://").partition("/")[0]:
        raise ValueError(f"{prefix}holds credentials (user:password@), which S3 does not take from the URI and "
                         "the run would record; remove them and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


def judge_key_problem(judge: BaseModel, prefix: str) -> None:
    """The judge's key source names a judge key (ValueError naming the field), and its URL holds none."""
    from urllib.parse import parse_qsl, urlsplit

    if not JUDGE_KEY_ENV.fullmatch(judge.api_key_env) or judge.api_key_env in NOT_JUDGE_KEYS:
        raise ValueError(
            f"{prefix}api_key_env={judge.api_key_env!r}: the judge sends this variable to {prefix}base_url, so it must "
            f"be a judge's key: a name ending in _API_KEY other than {', '.join(sorted(NOT_JUDGE_KEYS))} "
            "(e.g. OPENAI_API_KEY, JUDGE_API_KEY)")
    if judge.api_key_secret is not None and not JUDGE_KEY_BLOCK.fullmatch(judge.api_key_secret):
        raise ValueError(
            f"{prefix}api_key_secret={judge.api_key_secret!r}: the judge sends this Secret block to {prefix}base_url, "
            "so it must be a judge's key: a block name ending in 'api-key' (e.g. 'judge-api-key')")
    if not judge.base_url:
        return
    url = urlsplit(judge.base_url)
    if url.username or url.password:
        raise ValueError(f"{prefix}base_url: holds a user name or password, which the run's config would record "
                         f"(config.json, report, W&B); put the key in {prefix}api_key_env or {prefix}api_key_secret")
    if any(QUERY_SECRETS.search(name) for name, _ in parse_qsl(url.query, keep_blank_values=True)):
        raise ValueError(f"{prefix}base_url: its query holds a key or token, which the run's config would record "
                         f"(config.json, report, W&B); put the key in {prefix}api_key_env or {prefix}api_key_secret")


def judge_problem(judge: BaseModel, prefix: str) -> None:
    """A judge's settings take effect (ValueError naming the field): none moved while it is off, and
    its backend and the settings that belong to it agree (the run's judge and the arena's)."""
    if not judge.enabled:
        unused(judge, tuple(n for n in type(judge).model_fields if n != "enabled"), prefix,
               f"{prefix}enabled is false, so the judge does not run")
    if judge.backend == "local":
        unused(judge, ("base_url", "api_key_env", "api_key_secret"), prefix,
               f"only the 'openai' backend uses them (set {prefix}backend: openai)")
    judge_key_problem(judge, prefix)
    if judge.backend == "openai" and (not judge.base_url or judge.model == "auto"):
        raise ValueError(f"{prefix}backend 'openai' needs {prefix}base_url and {prefix}model (the endpoint's model name)")


class JudgeEndpoint(Section):
    """Who judges: the fields the run's judge and the arena's share (tasks/judge_backends.py)."""

    enabled: bool = Field(True, description="Run the judge.")
    backend: Literal["local", "openai"] = Field(
        "local", description="local: a transformers model on this machine; openai: any OpenAI-compatible endpoint.")
    model: str = Field(
        "auto", description="local: hub id or model directory ('auto': the built-in SmolLM2-135M-Instruct, a weak "
        "judge); openai: the endpoint's model name.")
    base_url: str | None = Field(None, description="openai backend: e.g. http://127.0.0.1:8000/v1 (vLLM, TGI, Ollama).")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai backend: environment variable holding the key; a name ending in "
        "_API_KEY (the judge sends it to base_url: never another service's credential).")
    api_key_secret: str | None = Field(
        None, description="openai backend: name of a Prefect Secret block holding the key (used when set), "
        "ending in 'api-key'.")

    @model_validator(mode="after")
    def _endpoint(self) -> JudgeEndpoint:
        judge_problem(self, "judge.")
        return self
