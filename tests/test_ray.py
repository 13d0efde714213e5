"""Benchmark fan-out on a real local Ray cluster: the same per-item results as the sequential run."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from prefect import flow
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from tasks.config import BenchmarkConfig, ExecutionConfig
from tasks.device import publish, unpublish
from tasks.evaluation import score_base_and_tuned, shards

BENCHMARKS = [
    # limit 3, not conftest's 2: a task cached by another test must not stand in for Ray's work
    BenchmarkConfig(name="mmlu", limit=3, batch_size=2, subsets=["astronomy", "high_school_biology"]),
    BenchmarkConfig(name="gsm8k", limit=3, batch_size=2),
]


@flow
def score(base, tuned, execution: ExecutionConfig):
    publish(execution)
    try:
        return score_base_and_tuned(base, tuned, BENCHMARKS)
    finally:
        unpublish()


def _processes_under(folder: str) -> list[int]:
    """Live processes whose command line names `folder` (read from /proc: `ps` cuts long lines)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if folder.encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found


def test_mmlu_is_sharded_by_subject():
    parts = shards(BENCHMARKS[0], 1)
    assert [p.subsets for p in parts] == [["astronomy"], ["high_school_biology"]]
    assert shards(BENCHMARKS[1], 1) == [BENCHMARKS[1]]  # GSM8K has no subsets


@pytest.mark.slow
def test_ray_gives_the_sequential_results(tiny_ref, tiny_base_model_dir, monkeypatch):
    from tasks.models import resolve_model

    tuned = resolve_model.fn(str(tiny_base_model_dir))
    # A short private Ray folder (unix socket paths are limited to ~107 bytes): the raylet and
    # workers of this test carry it on their command lines, so leftovers can be found by it.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    try:
        on_ray = score(tiny_ref, tuned, ExecutionConfig(precision="fp32", task_runner="ray", ray_num_cpus=2,
                                                          shard_size=1))
        assert list(Path(ray_tmp).glob("ray/session_*")), "no Ray session was started"  # RAY_TMPDIR/ray/
        deadline = time.monotonic() + 60  # ray.shutdown() signals its processes; they exit soon after
        while left := _processes_under(ray_tmp):
            assert time.monotonic() < deadline, f"Ray processes left after the flow: {left}"
            time.sleep(0.5)
        with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):  # computed again, not Ray's cached results
            sequential = score(tiny_ref, tuned, ExecutionConfig(precision="fp32"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert set(on_ray) == set(sequential) == {"mmlu", "gsm8k"}
    for name in on_ray:
        for which in ("base", "tuned"):
            ray_result, seq_result = on_ray[name][which], sequential[name][which]
            assert ray_result.records == seq_result.records, f"{name} {which}: per-item results differ"
            assert ray_result.n == seq_result.n and ray_result.score == seq_result.score
            assert ray_result.stderr == seq_result.stderr and ray_result.metrics == seq_result.metrics
    assert on_ray["mmlu"]["base"].settings["shards"] == 2 and on_ray["mmlu"]["base"].n == 6
    assert on_ray["mmlu"]["base"].settings["subsets"] == ["astronomy", "high_school_biology"]
    assert os.environ.get("SMOLFLOW_EXECUTION") is None
