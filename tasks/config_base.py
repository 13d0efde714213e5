"""What every section of the run configuration shares: unknown keys and true/false for a number are
refused, and so are settings that would have no effect (a setting is never silently ignored)."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


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


def judge_problem(judge: BaseModel, prefix: str) -> None:
    """A judge's settings take effect (ValueError naming the field): none moved while it is off, and
    its backend and the settings that belong to it agree (the run's judge and the arena's)."""
    if not judge.enabled:
        unused(judge, tuple(n for n in type(judge).model_fields if n != "enabled"), prefix,
               f"{prefix}enabled is false, so the judge does not run")
    from urllib.parse import urlsplit

    if judge.base_url and (urlsplit(judge.base_url).username or urlsplit(judge.base_url).password):
        raise ValueError(f"{prefix}base_url: holds a user name or password, which the run's config would record "
                         f"(config.json, report, W&B); put the key in {prefix}api_key_env or {prefix}api_key_secret")
    if judge.backend == "openai" and (not judge.base_url or judge.model == "auto"):
        raise ValueError(f"{prefix}backend 'openai' needs {prefix}base_url and {prefix}model (the endpoint's model name)")
    if judge.backend == "local":
        unused(judge, ("base_url", "api_key_env", "api_key_secret"), prefix,
               f"only the 'openai' backend uses them (set {prefix}backend: openai)")
