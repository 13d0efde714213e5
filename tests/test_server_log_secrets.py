"""The serve server's log holds no webhook URL: when the alert webhook answers an error, Prefect's
webhook block logs httpx's `HTTPStatusError ... for url '<webhook URL>'` inside the server process,
and a webhook's URL is its secret. A real server (as `smolflow serve` starts it), a real automation,
a receiver that answers 404."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.local import server_env, start_server
from deployments.prefect_server import redact_paths
from tests.conftest import prefect_home
from tests.test_alerts import webhook_receiver
from tests.test_serve_lifecycle import _free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "T0K3N-do-not-log-" + "7" * 8

FAIL_A_NIGHTLY = """
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Failed
from deployments.alerts import ensure_alerts, save_webhook_block
import sys

ensure_alerts(save_webhook_block(sys.argv[1], "smolflow-alerts-404"))

@flow(name="smolflow-finetune")
def stand_in() -> None:
    pass

with get_client(sync_client=True) as client:
    run = client.create_flow_run(stand_in, name="nightly-that-failed", tags=["smolflow", "nightly"])
    client.set_flow_run_state(run.id, Failed(message="dataset missing"), force=True)
"""


def test_urls_lose_their_paths_except_the_servers_own():
    said = "Client error '404 Not Found' for url 'https://hooks.example.com/services/T0/B0/xyz?sig=1'"
    assert redact_paths(said) == "Client error '404 Not Found' for url 'https://hooks.example.com/…'"
    assert redact_paths("http://u:pw@host:8/a/b") == "http://host:8/…"
    own = "see http://127.0.0.1:4200/api/health"
    assert redact_paths(own, ("127.0.0.1:4200",)) == own


@pytest.mark.slow
def test_a_failing_webhook_leaves_no_url_in_the_server_log(tmp_path):
    port, log = _free_port(), tmp_path / "server.log"
    server = start_server(port, home=prefect_home(tmp_path / "home"), log=log, timeout=300)
    try:
        with webhook_receiver(404, f"/hook/{SECRET}") as (hook, posted):
            env = server_env(port, tmp_path / "home") | {"PYTHONPATH": str(ROOT)}
            made = subprocess.run([sys.executable, "-c", FAIL_A_NIGHTLY, hook], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert made.returncode == 0, made.stderr[-3000:]
            deadline = time.monotonic() + 120
            while "404 Not Found" not in log.read_text(errors="replace") and time.monotonic() < deadline:
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert not posted.empty(), "the automation never called the webhook"
    assert "404 Not Found" in text, text[-3000:]  # the failure is logged: what it names is the point
    assert SECRET not in text and f"{hook.split('/hook/')[0]}/…" in text, text[-3000:]
