"""prefect.yaml on a real Prefect server: a process work pool, `prefect deploy`, a
`prefect worker start` that runs a deployment end to end, and a stop that leaves nothing running.

Slow-ish (~1-2 min: a server, the CLI three times, a worker and a flow run in a subprocess), the
price of checking the whole path the documentation describes; the model is the tiny Llama."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.local import server_env, start_server, stop
from tasks.storage import ArtifactStore
from tests.conftest import prefect_home, tiny_run_config
from tests.test_deployments import _free_port
from tests.test_flow import check_run_folder

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _leftovers(pgid: int, flow_run_id: str) -> list[str]:
    """Running processes (zombies excluded) in process group `pgid` or of flow run `flow_run_id`
    (a process worker gives a flow run's process PREFECT__FLOW_RUN_ID, wherever its group is)."""
    live = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            mine = int(fields[2]) == pgid or f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in (proc / "environ").read_bytes()
            if mine and fields[0] != "Z":
                live.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked, or not ours to read
    return live


@pytest.mark.slow
def test_process_pool_worker_runs_a_deployment(tiny_model_dir, tmp_path):
    port = _free_port()
    server = start_server(port, home=prefect_home(tmp_path / "home"), log=tmp_path / "server.log")
    env = server_env(port, tmp_path / "home") | {"SMOLFLOW_ROOT": str(ROOT), "PYTHONPATH": str(ROOT)}
    # As docs/scale.md says: deployed without SMOLFLOW_ROOT (a value there is written into the
    # deployments: every worker would change into the deploying machine's folder), which each worker sets.
    deploying = {k: v for k, v in env.items() if k != "SMOLFLOW_ROOT"}
    worker = None
    try:
        def cli(*args):
            out = subprocess.run([PREFECT, *args], cwd=ROOT, env=deploying, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
            return out.stdout

        cli("work-pool", "create", "smolflow", "--type", "process")
        cli("deploy", "--all", "--no-prompt")
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "smolflow", "--limit", "1"], cwd=ROOT,
                                  env=env, stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        config = tiny_run_config(tiny_model_dir, str(tmp_path / "artifacts"), output={"run_id": "by-a-worker"})
        with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), \
                get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("smolflow-finetune/pool-on-demand")
            assert deployment.work_pool_name == "smolflow"
            assert "{{ $SMOLFLOW_ROOT }}" in json.dumps(deployment.pull_steps)  # the worker's, at run time
            nightly = client.read_deployment_by_name("smolflow-finetune/pool-nightly")
            assert nightly.schedules[0].schedule.cron == "0 2 * * *"
            run = client.create_flow_run_from_deployment(deployment.id,
                                                         parameters={"config": config.model_dump(mode="json")})
            deadline = time.monotonic() + 600
            while not (run := client.read_flow_run(run.id)).state.is_final():
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"flow run still {run.state.name}"
                time.sleep(2)
            assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-3000:]
            assert run.work_pool_name == "smolflow"
        check_run_folder(ArtifactStore(str(tmp_path / "artifacts")).child("runs", "by-a-worker").uri)
    finally:
        if worker is not None:
            stop(worker)  # SIGTERM, then SIGINT (a worker needs both), then SIGKILL
        stop(server)
    # Nothing of the worker is left: the CLI, its worker process, any flow-run process. (Whether
    # Prefect's CLI ends its worker process itself or needs the SIGKILL depends on how the signals
    # meet its handlers: both were seen here, the first run finished either way. What a user needs
    # is that a stop leaves nothing running.)
    deadline = time.monotonic() + 60
    while left := _leftovers(worker.pid, str(run.id)):
        assert time.monotonic() < deadline, f"still running after the worker's stop: {left}"
        time.sleep(1)
    log = (tmp_path / "worker.log").read_text()
    assert "by-a-worker" in log or "Completed" in log, log[-2000:]
