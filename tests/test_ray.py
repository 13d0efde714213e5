"""Benchmark fan-out on a real local Ray cluster (MMLU in subject shards, GSM8K in item shards): the
same per-item results as the sequential run."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from prefect import flow
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from tasks.config import BenchmarkConfig, ExecutionConfig
from tasks.device import publish, unpublish
from tasks.evaluation import _jobs, score_base_and_tuned, shards
from tasks.leftovers import alive, descendants, process_mark, processes_under, with_start_times
from tasks.ray_scoring import SESSION_MARK, ray_runner, reap_sessions, submission_order

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


def test_mmlu_is_sharded_by_subject():
    parts = shards(BENCHMARKS[0], 1)
    assert [p.subsets for p in parts] == [["astronomy"], ["high_school_biology"]]
    assert shards(BENCHMARKS[1], 1) == [BENCHMARKS[1]]  # GSM8K has no subsets


def test_the_longest_tasks_are_submitted_first():
    """Every task is queued at once; one long task starting last would leave the other workers idle
    while it runs (GSM8K behind MMLU's shards), so the longest go first, ties in config order."""
    from tasks.benchmarks.custom import load_definition
    from tasks.runtime import FIXTURES

    subjects = ["astronomy", "high_school_biology", "high_school_mathematics"]
    benchmarks = [BenchmarkConfig(name="mmlu", limit=3, subsets=subjects), BenchmarkConfig(name="gsm8k", limit=20),
                  BenchmarkConfig(name="mmlu", limit=None, subsets=subjects), BenchmarkConfig(name="humaneval", limit=None)]
    custom = [load_definition(FIXTURES / "custom" / "capitals.yaml")]  # 8 short generations x 2
    jobs = _jobs(benchmarks, custom, None, 1)
    order = [(jobs[i][0], getattr(jobs[i][2].get("cfg"), "limit", None), getattr(jobs[i][2].get("cfg"), "subsets", None))
             for i in submission_order(jobs)]
    assert order == [
        ("humaneval", None, None),  # 164 items x 9.5
        *[("mmlu", None, [s]) for s in subjects],  # ~246 questions each (14,042 over 57 subjects)
        ("gsm8k", 20, None),  # 20 x 7
        ("custom/capitals", None, None),
        *[("mmlu", 3, [s]) for s in subjects],  # 3 questions each, in subject order
    ]


def test_no_address_is_a_cluster_of_the_runs_own(monkeypatch):
    """A bare ray.init() joins a cluster `ray start` left on the machine (and the run then removed its
    session folder): "local" always starts one. RAY_ADDRESS, which Ray reads, still joins that one."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_runner(ExecutionConfig(task_runner="ray")).address == "local"
    assert ray_runner(ExecutionConfig(task_runner="ray", ray_address="10.0.0.1:6379")).address == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert ray_runner(ExecutionConfig(task_runner="ray")).address == "10.0.0.2:6379"


def test_a_local_cluster_reports_to_the_temporary_server_of_the_flow():
    """Without PREFECT_API_URL Prefect starts a temporary server for the flow; a local cluster's
    workers get its address (each started a server of its own before, and the benchmark task runs
    went there, missing from the flow's); a remote cluster's workers cannot reach it."""
    from prefect import get_client
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    def forwarded(execution):
        return ray_runner(execution).init_kwargs["runtime_env"]["env_vars"].get("PREFECT_API_URL")

    @flow
    def placement() -> tuple:
        with get_client(sync_client=True) as client:
            used = str(client.api_url).rstrip("/")
        return used, forwarded(ExecutionConfig(task_runner="ray")), forwarded(
            ExecutionConfig(task_runner="ray", ray_address="ray://head:10001"))

    server = SubprocessASGIServer()
    was_running = server.running
    try:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            used, local, remote = placement()
    finally:
        if not was_running:
            server.stop()
    assert used.startswith("http://127.0.0.1:") and local == used
    assert remote is None


class _Seen(dict):
    nice: dict[tuple[int, str], int]

    def __init__(self):
        super().__init__()
        self.nice = {}


@contextmanager
def cluster_processes(ray_tmp: str):
    """Every process of the Ray cluster under `ray_tmp` while it runs, {(pid, start time): name}:
    the ones naming the folder and all below them, noted every 0.5 s. Workers and agents rename
    themselves (ray::IDLE, ray::DashboardAgent...): processes_under alone never sees them. Their
    niceness goes into seen.nice, under the same keys."""
    seen = _Seen()
    done = threading.Event()

    def watch():
        while not done.is_set():
            nodes = processes_under(ray_tmp)
            for pid, start in (with_start_times(nodes) | descendants(*nodes)).items():
                try:
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                    nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
                except (OSError, IndexError, ValueError):
                    continue
                seen[(pid, start)] = name  # workers rename themselves as they take tasks: the last name
                seen.nice[(pid, start)] = nice
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


def test_a_killed_runs_session_folder_goes_with_the_next_run(tmp_path):
    """A SIGKILLed run's cluster dies with it (Ray fate-shares its GCS and raylet with the driver)
    but its session folder stays for good. The next run removes it: only a folder it marked as its
    own, whose run is gone and which no process names."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    root = tmp_path / "ray"

    def session(name: str, mark: dict | None) -> Path:
        (root / name / "logs").mkdir(parents=True)
        if mark is not None:
            (root / name / SESSION_MARK).write_text(json.dumps(mark))
        return root / name

    killed = session("session_1_killed", {**process_mark(), "pid": gone.pid})
    (root / "session_latest").symlink_to(killed)
    running = session("session_2_running", process_mark())  # this process: a run that still goes on
    someone = session("session_3_ray_start", None)  # `ray start`'s, another tool's: not ours
    named = session("session_4_named", {**process_mark(), "pid": gone.pid})
    # A process still holds it: a Ray agent orphaned by the driver's SIGKILL lives on for a minute or
    # more with its log files open, its command line renamed (ray::DashboardAgent)
    with open(named / "logs" / "dashboard_agent.out", "w") as log:
        holder = subprocess.Popen(["sleep", "60"], stdout=log)
    try:
        assert reap_sessions(root) == [killed]
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in root.iterdir()) == ["session_2_running", "session_3_ray_start", "session_4_named"]
    assert reap_sessions(root) == [named] and running.is_dir() and someone.is_dir()


# A run as it starts its own cluster: the note first, then ray.init() makes the session folder (named
# as Ray names it) and, 4-5 s later on 2 cores, returns, when the run marks the folder; SIGKILLed between.
_STARTING_RUN = """
import datetime, os, sys
from pathlib import Path
from tasks.ray_scoring import _note_starting
assert _note_starting() is not None
stamp = datetime.datetime.today().strftime("%Y-%m-%d_%H-%M-%S_%f")
(Path(os.environ["RAY_TMPDIR"]) / "ray" / f"session_{stamp}_{os.getpid()}" / "logs").mkdir(parents=True)
print("started", flush=True)
sys.stdin.read()  # until killed, or until the test that started it is gone (its pipe closes)
"""


def test_a_run_killed_while_ray_init_starts_its_cluster_leaves_no_session_folder(tmp_path):
    """A SIGKILL while ray.init() ran left a session folder that the run had not marked as its own yet
    (it can only once ray.init() returns), so no later run removed it. Its note names its process."""
    root, env = tmp_path / "ray", os.environ | {"RAY_TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}

    def start() -> subprocess.Popen:
        run = subprocess.Popen([sys.executable, "-c", _STARTING_RUN], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        assert run.stdout.readline() == "started\n"
        return run

    killed, running = start(), start()
    try:
        killed.kill()
        killed.wait()
        # The same pid in an older folder's name: another process's, before this run; and a cluster someone started
        older = root / f"session_2026-01-01_00-00-00_000001_{killed.pid}"
        (older / "logs").mkdir(parents=True)
        (root / "session_2026-01-02_00-00-00_000001_4242" / "logs").mkdir(parents=True)
        left = {p.name for p in root.glob(f"session_*_{killed.pid}")} - {older.name}
        assert len(left) == 1 and len(list(root.glob(".smolflow-starting-*.json"))) == 2
        assert [p.name for p in reap_sessions(root)] == list(left)
        # The killed run's note went with it; the running one's folder and note, and the others, stay
        assert sorted(p.name for p in root.iterdir()) == sorted(
            [older.name, "session_2026-01-02_00-00-00_000001_4242", f".smolflow-starting-{running.pid}.json",
             *(p.name for p in root.glob(f"session_*_{running.pid}"))])
        assert len(list(root.glob(f"session_*_{running.pid}"))) == 1 and reap_sessions(root) == []
    finally:
        running.kill()
        running.wait()


@pytest.mark.slow
def test_ray_gives_the_sequential_results(tiny_ref, tiny_base_model_dir, monkeypatch):
    from tasks.models import resolve_model

    tuned = resolve_model.fn(str(tiny_base_model_dir))
    # A short private Ray folder (unix socket paths are limited to ~107 bytes): the raylet and
    # workers of this test carry it on their command lines, so leftovers can be found by it.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    try:
        with cluster_processes(ray_tmp) as seen:
            state = score(tiny_ref, tuned, ExecutionConfig(precision="fp32", task_runner="ray", ray_num_cpus=2,
                                                             shard_size=1, item_shards=2), return_state=True)
        on_ray = state.result()
        assert (Path(ray_tmp) / "ray").is_dir(), "no local Ray cluster was started here"  # RAY_TMPDIR/ray/
        assert any(name.startswith("ray::") for name in seen.values()), f"no worker or agent seen: {seen}"
        # At the run's priority: Ray starts workers at nice 15, and beside other work (CI's 2 busy
        # cores) this scoring took 167-393 s, or hung past 7 min, against ~30 s alone.
        workers = {key: seen.nice[key] for key, name in seen.items() if name.startswith("ray::")}
        assert set(workers.values()) == {0}, f"worker niceness: {workers}"
        # Nothing of the cluster runs once the flow is back: no wait (the run stops them all; it waited
        # up to 30 s here, then this test 60 s, for the 5 processes that name the folder: 53-197 s in CI)
        left = alive(dict(seen.keys()))
        assert not left, f"Ray processes left after the flow: {[seen[p] for p in seen if p[0] in left]}"
        assert not processes_under(ray_tmp)
        # The cluster's session folder (logs, sockets) is gone with it: Ray keeps each otherwise
        assert sorted(p.name for p in (Path(ray_tmp) / "ray").iterdir()) == [], "a Ray session folder was left"
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
            # fp32: comparable with the sequential run (merged shards once got another key: the engine string)
            assert ray_result.comparability_key == seq_result.comparability_key
    assert on_ray["mmlu"]["base"].settings["shards"] == 2 and on_ray["mmlu"]["base"].n == 6
    assert on_ray["mmlu"]["base"].settings["subsets"] == ["astronomy", "high_school_biology"]
    assert on_ray["gsm8k"]["base"].settings["shards"] == 2 and on_ray["gsm8k"]["base"].n == 3  # items 0, 2 | 1
    assert os.environ.get("SMOLFLOW_EXECUTION") is None
    # The workers reported their task runs to the flow's server, under the flow run
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    names = sorted(r.name for r in runs if r.name.startswith("benchmark-"))
    assert names == ["benchmark-gsm8k-base"] * 2 + ["benchmark-gsm8k-tuned"] * 2 + ["benchmark-mmlu-base"] * 2 + ["benchmark-mmlu-tuned"] * 2
    assert all(r.state.is_completed() for r in runs if r.name.startswith("benchmark-"))
