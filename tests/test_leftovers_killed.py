"""Nothing a smolflow process starts outlives its SIGKILL (the out-of-memory killer's): its temporary
Prefect server dies with it (PR_SET_PDEATHSIG, tasks/leftovers.py), not at the next run's reaping.
Real processes, a real server, a real SIGKILL. Slow-ish: a temporary server has to start each time."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.local import descendants
from tasks.leftovers import SERVER_MARK, _running, orphaned_servers
from tests.conftest import prefect_home
from tests.test_leftovers import kill

ROOT = Path(__file__).resolve().parents[1]

# As a smolflow process: `tasks` imported first. "thread": the server is started by a thread that
# ends before the flow runs (PR_SET_PDEATHSIG follows the forking *thread*: done naively, the server
# died with that thread, and the flow after it failed to reach it).
FLOW = """
import sys, threading
from pathlib import Path
import tasks  # noqa: F401
from prefect import flow

if sys.argv[2] == "thread":
    from prefect.client.orchestration import get_client
    starter = threading.Thread(target=get_client, kwargs={"sync_client": True})
    starter.start()
    starter.join()

@flow
def wait():  # until SIGKILLed, or its stdin closes (the test's end, or death): nothing outlives the test
    Path(sys.argv[1]).touch()
    sys.stdin.read()

wait()
"""


def _servers(pid: int) -> list[int]:
    return [p for p in descendants(pid) if SERVER_MARK in Path(f"/proc/{p}/cmdline").read_bytes()]


def _gone_soon(pids: list[int], seconds: float = 20) -> list[int]:
    """Those of `pids` still running after `seconds`."""
    deadline = time.monotonic() + seconds
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("started_by", ["main", "thread"])
def test_a_sigkilled_flows_temporary_server_dies_with_it(tmp_path, started_by):
    home, ready = prefect_home(tmp_path / "prefect-home"), tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    proc = subprocess.Popen([sys.executable, "-c", FLOW, str(ready), started_by], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 400
        while not ready.exists():  # the flow runs: its server answered, after the starter thread ended
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the flow never started"
            time.sleep(0.2)
        servers = _servers(proc.pid)
        assert servers, "the flow runs without a temporary server"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert _gone_soon(servers) == [], "the temporary server outlived its SIGKILLed flow process"
        assert orphaned_servers(str(home)) == []
    finally:
        proc.kill()
        proc.wait()
        kill(*servers)


@pytest.mark.slow
def test_a_sigkilled_smolflow_command_leaves_no_server(tiny_model_dir, tmp_path):
    # The real command line: `tasks` is imported before Prefect's server module, whichever comes first.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "WANDB_SERVICE"))}
    env |= {"PREFECT_HOME": str(prefect_home(tmp_path / "prefect-home")), "PYTHONPATH": str(ROOT),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--verbose", "eval", "--model", str(tiny_model_dir), "--benchmarks",
         '[{"name": "gsm8k", "limit": 1, "batch_size": 1}]', "--judge.enabled", "false", "--wandb.mode", "disabled",
         "--output.artifacts-uri", str(tmp_path / "runs"), "--output.run-id", "killed"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    left: list[int] = []
    try:
        seen = []
        for line in proc.stdout:  # once the flow runs, its server is up
            seen.append(line)
            if "Beginning flow run" in line:
                break
        servers = _servers(proc.pid)
        assert servers, "".join(seen)[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        left = _gone_soon(servers)
        assert left == [], "the temporary server outlived its SIGKILLed `smolflow eval`"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill(*left)
