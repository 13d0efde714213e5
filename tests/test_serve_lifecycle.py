"""`make serve` (python -m deployments.local) as an operator's supervisor sees it: SIGTERM stops
every process it started, the deployments stay active across a restart, a busy port is refused.
Real processes, a real `prefect server start`, real signals. ~60-90 s on 2 busy cores: it starts a
server twice and imports the flow once (the price of testing the real supervisor)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.local import alive, descendants, start_server, stop

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    dropped = ("PREFECT_API", "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED")  # the latter: deployments.local sets it
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    return env | {"PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _wait_for_deployments(api: str, deadline_s: float, log: Path, parent: subprocess.Popen | None = None,
                          name: str = "smolflow-finetune/nightly"):
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                return client.read_deployment_by_name(name)  # serve registers them one by one
            except Exception:
                alive = parent is None or parent.poll() is None
                assert alive and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)


def _all_gone(children: dict[int, str], within_s: float, log: Path) -> None:
    deadline = time.monotonic() + within_s
    while (left := alive(children)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"outlived the parent: {left}\n" + log.read_text()[-3000:]


@pytest.mark.slow
def test_sigterm_stops_every_child_and_the_nightly_survives_a_restart(tmp_path):
    port, home, log = _free_port(), tmp_path / "home", tmp_path / "serve.log"
    api = f"http://127.0.0.1:{port}/api"
    with open(log, "wb") as out:
        parent = subprocess.Popen([sys.executable, "-m", "deployments.local", "--port", str(port),
                                   "--startup-timeout", "600"],
                                  cwd=ROOT, env=_env(home), stdout=out, stderr=subprocess.STDOUT)
    try:
        nightly = _wait_for_deployments(api, 900, log, parent)
        assert not nightly.paused
        children = descendants(parent.pid)  # the server, the serve process and all of theirs
        assert len(children) >= 2, children
        # Started as `python -m deployments.local`, the server too deletes finished flow runs after 90 days
        (server,) = [pid for pid in children if b"server\0start" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
        assert b"PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED=events,flow_runs" in environ
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=120) == 0, log.read_text()[-3000:]
        _all_gone(children, 60, log)
    finally:
        if parent.poll() is None:
            parent.kill()

    # A restart (here: the server alone, on the same database) finds the nightly as it was.
    server = start_server(port, home=home, log=tmp_path / "server2.log", timeout=600)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            after = client.read_deployment_by_name("smolflow-finetune/nightly")
        assert not after.paused, "stopping serve paused the nightly"
        assert after.schedules and all(s.active for s in after.schedules)
        assert after.schedules[0].schedule.cron == nightly.schedules[0].schedule.cron
    finally:
        stop(server)


def test_a_busy_port_is_an_error_not_an_attachment(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "deployments.local", "--port", str(port)], cwd=ROOT,
                             env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr and "--port" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_bad_nightly_setting_is_an_error_before_the_server_starts(tmp_path):
    # `python -m deployments.local` with settings, as `make serve ARGS=...` passes them (a typo too).
    out = subprocess.run([sys.executable, "-P", "-m", "deployments.local", "--port", str(_free_port()), "--prot", "4201"],
                         cwd=tmp_path, env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: flag --prot: prot: unknown setting"), out.stderr
    assert not (tmp_path / "home").exists()  # no server was started (it would have made its database there)
