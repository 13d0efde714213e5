"""Prefect cache policies of smolflow's expensive tasks: same content + same settings + same code = cached."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect.cache_policies import CachePolicy, Inputs
from prefect.settings import get_current_settings

from tasks.cache_limit import cache_root
from tasks.code_version import computed_by
from tasks.device import cache_token


@dataclass
class ContentInputs(CachePolicy):
    """Prefect's INPUTS cache policy, except that a model or dataset reference counts by its
    content fingerprint alone: where a model lies (this run's folder, an earlier run's, a
    download cache) is no part of what it is, so moving it must not invalidate the cache."""

    exclude: list[str] = field(default_factory=list)

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        inputs = {k: getattr(v, "fingerprint", v) for k, v in (inputs or {}).items()}
        # Device and precision change a model's outputs: a bf16 result never answers for fp32.
        inputs["__placement__"] = cache_token()
        return Inputs(exclude=self.exclude).compute_key(task_ctx, inputs, flow_parameters, **kwargs)

    def __sub__(self, name: str) -> ContentInputs:
        return ContentInputs(exclude=[*self.exclude, name])


@dataclass
class Code(CachePolicy):
    """The code that computes the result in the key: the source of the task's module and of every
    smolflow module it reaches, and the versions of the libraries that compute (tasks/code_version.py).
    Prefect's TASK_SOURCE sees the task function alone: a fix to a scorer, the generation loop or
    the way scores are keyed left results cached by the older code answering for the new."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return computed_by(task_ctx.task.fn.__module__)


# The code part of every cached task's key. The shape of its result is in it too: the models a task
# returns are defined in the modules it reaches (health's `Sign.checked`, once a field added to a
# result cached without it, made the next task fail on the missing attribute).
CODE = Code()
# The policy of every expensive task: same content + same settings + same code = cached.
BY_CONTENT = ContentInputs() + CODE


def results_storage() -> Path | None:
    """Where smolflow's flows keep their tasks' results (what a cache hit hands back):
    SMOLFLOW_CACHE/results, under the cache bound (`output.cache_max_gb`), least recently used
    first. Prefect's default, ~/.prefect/storage, is never cleaned: a nightly on the full suite adds
    ~130 MB there (every benchmark's per-item records and lm-eval's samples). Where Prefect's
    settings name a place (a default storage block, e.g. an S3 bucket shared by several machines,
    or a local storage path), that place keeps them instead, unbounded by smolflow."""
    results = get_current_settings().results
    if results.default_storage_block or "local_storage_path" in results.model_fields_set:
        return None
    return cache_root() / "results"
