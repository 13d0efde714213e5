"""A SIGKILLed run's local Ray cluster goes at once (tasks/ray_watchdog.py): its dashboard and
runtime-env agents, orphaned, lived on for ~60 s with the session folder open."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.leftovers import alive, processes_using, with_start_times
from tasks.ray_watchdog import STARTING, guarding

ROOT = Path(__file__).resolve().parents[1]

# A run's scoring on its own local cluster, as tasks/evaluation.py enters it, until killed.
_RUN = """
import os, sys
import ray
from tasks.config import ExecutionConfig
from tasks.ray_scoring import _own_cluster_stopped, _session, ray_runner

runner = ray_runner(ExecutionConfig(task_runner="ray", ray_num_cpus=1))
with _own_cluster_stopped(runner):
    worker = ray.remote(lambda: os.getpid())
    print(ray.get(worker.remote()), _session(runner), flush=True)
    sys.stdin.read()  # until killed, or until the test that started it is gone (its pipe closes)
"""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").strip()
    except OSError:  # gone meanwhile
        return ""


def _name(pid: int) -> str:
    return _cmdline(pid).split(" ")[0]


def _waited(check, within: float) -> float:
    """Seconds until check() held, polling; fails past `within`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, f"not within {within} s"
        time.sleep(0.2)
    return time.monotonic() - start


def test_a_killed_runs_cluster_goes_at_once(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: unix socket paths are limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_SERVICE")}
    env |= {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    run = subprocess.Popen([sys.executable, "-c", _RUN], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    held: dict[int, str] = {}
    try:
        worker, session = run.stdout.readline().split()

        def agents_up() -> bool:  # what outlived the raylet by a minute: its agents, as Ray renames them
            nonlocal held
            held = with_start_times(processes_using(session))
            return {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= set(map(_name, held))

        _waited(agents_up, within=60)
        assert int(worker) in held
        root = Path(ray_tmp) / "ray"
        watchdog = f"-m tasks.ray_watchdog {root} {run.pid}"

        def watchdogs() -> list[str]:
            return [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(int(p)).endswith(watchdog)]

        assert len(watchdogs()) == 1
        run.kill()
        run.wait()
        took = _waited(lambda: not alive(held) and not Path(session).exists(), within=20)
        assert not list(root.glob(STARTING.format(pid="*"))) and not (root / "session_latest").exists()
        _waited(lambda: not watchdogs(), within=5)  # it exits once it has cleared
        print(f"the killed run's cluster went in {took:.1f} s")
    finally:
        run.kill()
        run.wait()
        for pid in alive(held):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_watchdog_clears_only_what_the_block_started(tmp_path):
    """A block that leaves its session (a process holding it): cleared as the block ends. A folder
    of the same process from before the block, and another process's, stay."""
    root = tmp_path / "ray"
    before = root / f"session_2026-01-01_00-00-00_000001_{os.getpid()}"
    other = root / "session_2026-01-01_00-00-00_000001_4242"
    for folder in (before, other):
        (folder / "logs").mkdir(parents=True)
    holders = []
    try:
        with guarding(root) as dog:
            assert dog is not None and dog.poll() is None
            started = root / f"session_2026-01-02_00-00-00_000001_{os.getpid()}"
            (started / "logs").mkdir(parents=True)
            (root / "session_latest").symlink_to(started)
            for folder in (started, before):
                with open(folder / "logs" / "agent.out", "w") as log:  # open in the holder, as Ray's agents hold theirs
                    holders.append(subprocess.Popen(["sleep", "60"], stdout=log))
        assert dog.returncode == 0
        assert holders[0].wait(timeout=10) == -signal.SIGTERM and holders[1].poll() is None
        assert sorted(p.name for p in root.iterdir()) == sorted([before.name, other.name])
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_a_block_that_stopped_its_cluster_itself_leaves_the_watchdog_nothing_to_do(tmp_path):
    root = tmp_path / "ray"
    (root / STARTING.format(pid=os.getpid())).parent.mkdir(parents=True)
    (root / STARTING.format(pid=os.getpid())).write_text(json.dumps({}))
    start = time.monotonic()
    with guarding(root) as dog:
        pass
    assert dog.returncode == 0 and time.monotonic() - start < 10
    assert (root / STARTING.format(pid=os.getpid())).exists()  # a live run's note is the run's to remove
