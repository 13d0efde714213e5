"""`make serve` crashing (kill -9, a reboot) mid-run: nothing it started lives on, and the nightly
is not blocked after the restart. Real processes, a real `prefect server start`, real signals; a
file of its own so that these ~2.5 minutes run beside test_serve_lifecycle.py, not after it."""

import os
import signal
import subprocess
import sys
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.local import alive, descendants, start_server, stop
from tests.conftest import prefect_home
from tests.test_serve_lifecycle import ROOT, _all_gone, _env, _free_port, _wait_for_deployments


@pytest.mark.slow
def test_a_slot_held_by_a_run_that_died_with_its_server_is_freed_after_a_restart(tmp_path, monkeypatch):
    # The nightly's `concurrency_limit=1` slot: its runner and server are killed mid-run (kill -9, a
    # reboot); after the restart the next run must get the slot once the dead run's lease expires.
    from prefect.states import Pending, Running

    monkeypatch.setenv("PREFECT_SERVER_CONCURRENCY_INITIAL_DEPLOYMENT_LEASE_DURATION", "30")  # the minimum
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "2")
    port, home = _free_port(), prefect_home(tmp_path / "home")
    api = f"http://127.0.0.1:{port}/api"
    server = start_server(port, home=home, log=tmp_path / "server1.log", timeout=600)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deployment = client.create_deployment(flow_id=client.create_flow_from_name("smolflow-finetune"),
                                                  name="nightly", concurrency_limit=1)
            dead = client.create_flow_run_from_deployment(deployment)
            assert client.set_flow_run_state(dead.id, Pending()).status.value == "ACCEPT"
            assert client.set_flow_run_state(dead.id, Running()).status.value == "ACCEPT"
    finally:
        server.kill()  # the crash: nobody renews, releases or marks the run
        server.wait()
    server = start_server(port, home=home, log=tmp_path / "server2.log", timeout=600)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            later = client.create_flow_run_from_deployment(deployment)
            deadline = time.monotonic() + 150
            while (answer := client.set_flow_run_state(later.id, Pending())).status.value != "ACCEPT":
                assert time.monotonic() < deadline, f"the slot was never freed: {answer.details}"
                time.sleep(2)
    finally:
        stop(server)


@pytest.mark.slow
def test_a_sigkilled_supervisor_leaves_no_serve_process_or_flow_run_behind(tmp_path, tiny_model_dir):
    # kill -9 of `make serve` mid-run: its children get SIGTERM from the kernel; with the server
    # gone too, Prefect's runner retried the API for minutes and the flow run lived on.
    from prefect.client.schemas.objects import StateType

    from tests.conftest import tiny_run_config

    port, home, log = _free_port(), prefect_home(tmp_path / "home"), tmp_path / "serve.log"
    api = f"http://127.0.0.1:{port}/api"
    config = tiny_run_config(tiny_model_dir, str(tmp_path / "runs"), training={"max_steps": 100000},
                             benchmarks=[], judge={"enabled": False}, wandb={"mode": "disabled"})
    with open(log, "wb") as out:
        parent = subprocess.Popen([sys.executable, "-m", "deployments.local", "--port", str(port),
                                   "--startup-timeout", "600"],
                                  cwd=ROOT, env=_env(home), stdout=out, stderr=subprocess.STDOUT)
    children: dict[int, str] = {}
    try:
        on_demand = _wait_for_deployments(api, 900, log, parent, "smolflow-finetune/on-demand")
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(on_demand.id, parameters={"config": config.model_dump(mode="json")})
            deadline = time.monotonic() + 600
            while client.read_flow_run(run.id).state.type != StateType.RUNNING:
                assert parent.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        time.sleep(2)
        children = descendants(parent.pid)
        assert len(children) >= 3, children  # the server, the serve process, the flow run and theirs
        parent.kill()
        parent.wait()
        _all_gone(children, 90, log)
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in alive(children):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_sigkilled_serve_process_leaves_its_temporary_files_to_the_next_start(tmp_path):
    # The out-of-memory killer's SIGKILL of the serve process skips the runner's cleanup: its
    # runner_storage/<uuid> stayed in the temp folder, one per kill. It is in smolflow-tmp-<pid>-...
    # now, which the next smolflow process removes.
    port, home, tmp = _free_port(), prefect_home(tmp_path / "home"), tmp_path / "tmp"
    tmp.mkdir()
    server = start_server(port, home=home, log=tmp_path / "server.log", timeout=600)
    env = _env(home) | {"TMPDIR": str(tmp), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                        "SMOLFLOW_NIGHTLY_CRON": "0 12 31 12 *"}  # no nightly falls due while it runs
    serving = subprocess.Popen([sys.executable, "-m", "deployments.serve"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not list(tmp.rglob("runner_storage")) and time.monotonic() < deadline:
            assert serving.poll() is None, serving.stderr.read().decode()[-3000:]
            time.sleep(0.5)
        assert list(tmp.rglob("runner_storage")), "the runner never started"
        serving.kill()
        serving.wait(timeout=60)
        left = [p.name for p in tmp.iterdir()]
        assert left and all(name.startswith(f"smolflow-tmp-{serving.pid}-") for name in left), left
        subprocess.run([sys.executable, "-c", "from tasks.leftovers import own_temp_root; own_temp_root()"],
                       cwd=ROOT, env=env, check=True, timeout=120)  # any smolflow process, starting
        assert not list(tmp.iterdir()), [str(p) for p in tmp.rglob("*")]
    finally:
        if serving.poll() is None:
            serving.kill()
        stop(server)
