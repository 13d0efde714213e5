"""Prefect cache policies of smolflow's expensive tasks: same content + same settings + same code = cached."""

from __future__ import annotations

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


# The policy of every expensive task: same content + same settings + same code = cached.
BY_CONTENT = ContentInputs() + TASK_SOURCE
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
