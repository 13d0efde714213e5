"""Prefect cache policies of smolflow's expensive tasks: same content + same settings + same code = cached."""

from __future__ import annotations

import functools
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from prefect.cache_policies import TASK_SOURCE, CachePolicy, Inputs
from prefect.settings import get_current_settings

from tasks.cache_limit import cache_root
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
class Version(CachePolicy):
    """A constant in the key: a new value makes results cached by older code compute again, where
    TASK_SOURCE (the task function's own source) does not see the change."""

    value: str = ""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return self.value


@functools.cache
def result_shape(fn) -> str:
    """A digest of the fields of what `fn` returns (its return annotation, nested models included)."""
    from pydantic import TypeAdapter

    hint = typing.get_type_hints(fn).get("return")
    try:
        schema = TypeAdapter(hint).json_schema()
    except Exception:  # a type pydantic cannot describe: its name at least
        schema = repr(hint)
    return hashlib.sha256(json.dumps(schema, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ResultShape(CachePolicy):
    """The fields of the task's result in the key. TASK_SOURCE sees the task function's own source,
    not the models it returns: a field added to one (health's `Sign.checked`) left results cached by
    older code coming back without it, and the next task failed on the missing attribute."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return result_shape(task_ctx.task.fn)


# The code part of every cached task's key: the function's source and the shape of its result.
CODE = TASK_SOURCE + ResultShape()
# The policy of every expensive task: same content + same settings + same code = cached.
BY_CONTENT = ContentInputs() + CODE
# Benchmark results hold their comparability key. 2 (2026-12-04): bf16 keys hold the arrangement,
# and merged shards are keyed as the whole run. Older cached results would carry the old keys, so a
# cached base and a fresh tuned score would never compare.
RESULTS = Version(value="benchmark-results-2")  # by name: the first fields are CachePolicy's (key_storage, ...)


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
