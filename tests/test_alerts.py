"""Alerts on the real (session) Prefect server: a failed nightly run and a rejected promotion each
reach a local HTTP receiver through the user's webhook block within 60 s."""

import contextlib
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Failed

from deployments.alerts import FAILED_NIGHTLY, REJECTED, ensure_alerts, main, save_webhook_block
from tasks.config import GateConfig
from tasks.gate import regression_gate
from tasks.layout import RunPaths, run_dir
from tasks.pointers import set_pointer
from tasks.storage import ArtifactStore, write_manifest

FLOW = "smolflow-finetune"


@contextlib.contextmanager
def webhook_receiver(status: int = 200, path: str = "/hook"):
    """A webhook receiver on 127.0.0.1 answering `status`: (its URL, a queue of the JSON bodies POSTed)."""
    got: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            got.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}", got
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def receiver():
    with webhook_receiver() as (url, got):
        yield url, got


@pytest.fixture(scope="module")
def alerts(receiver):
    url, got = receiver
    ids = ensure_alerts(save_webhook_block(url, "smolflow-alerts-test"))
    assert len(ids) == 2
    yield got
    # The server outlives this module (test workers share it): later runs must not notify a closed receiver.
    with get_client(sync_client=True) as client:
        for name in (FAILED_NIGHTLY, REJECTED):
            for automation in client.read_automations_by_name(name):
                client.delete_automation(automation.id)


def _wait_for(got: queue.Queue, needle: str, timeout: float = 60) -> dict:
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            message = got.get(timeout=1)
        except queue.Empty:
            continue
        if needle in message.get("subject", ""):
            return message
        seen.append(message)
    raise AssertionError(f"no notification with {needle!r} within {timeout:.0f} s; got {seen}")


@pytest.mark.slow
def test_a_failed_nightly_run_notifies(alerts):
    @flow(name="smolflow-finetune")
    def stand_in() -> None:  # the flow run is made and failed through the API, as a crash would
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(stand_in, name="nightly-that-failed", tags=["smolflow", "nightly"])
        client.set_flow_run_state(run.id, Failed(message="dataset missing"), force=True)
    message = _wait_for(alerts, "nightly run nightly-that-failed failed")
    assert "prefect.flow-run.Failed" in message["text"] and "dataset missing" in message["text"]


def test_a_rejected_promotion_notifies(alerts, tmp_path):
    root = str(tmp_path)
    good = ArtifactStore(root).child(run_dir("good-run"))
    good.write_json(RunPaths.benchmark_summary("gsm8k", "tuned"), {"name": "gsm8k", "score": 0.6, "stderr": 0.01})
    write_manifest(good.uri, {"run_id": "good-run"})
    set_pointer(root, FLOW, "promoted", "good-run")
    worse = ArtifactStore(root).child(run_dir("worse-run"))  # scores saved where evaluation saves them
    worse.write_json(RunPaths.benchmark_summary("gsm8k", "tuned"), {"name": "gsm8k", "score": 0.1, "stderr": 0.01})
    worse.write_json(RunPaths.comparison, [{"benchmark": "gsm8k"}])
    decision = regression_gate.fn(root, FLOW, worse.uri, GateConfig(), [])
    assert not decision.promote
    message = _wait_for(alerts, "model of run worse-run not promoted")
    assert "promoted run good-run" in message["text"] and "gsm8k dropped 0.5000" in message["text"]


def test_alerts_script_names_a_missing_block(capsys):
    assert main(["--block", "custom-webhook/no-such-block"]) == 2
    err = capsys.readouterr().err
    assert "no-such-block" in err and "--webhook-url" in err and "Traceback" not in err
    assert err.startswith("error: --block='custom-webhook/no-such-block': no such notification block")


def test_rerunning_replaces_the_automations(alerts):
    ensure_alerts("custom-webhook/smolflow-alerts-test")
    with get_client(sync_client=True) as client:
        for name in (FAILED_NIGHTLY, REJECTED):
            assert len(client.read_automations_by_name(name)) == 1


def test_the_webhook_url_is_kept_as_a_secret(alerts):
    """A webhook URL is a credential (Slack's token is in its path): the block stores it among its
    secrets, which the server returns masked, and the alerts above still reach it (substituted)."""
    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name("smolflow-alerts-test", "custom-webhook", include_secrets=False)
    assert doc.data["url"] == "{{webhook_url}}" and "127.0.0.1" not in str(doc.data)


def test_an_empty_webhook_url_on_stdin_is_an_error(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["--webhook-url", "-"]) == 2
    assert capsys.readouterr().err.startswith("error: --webhook-url -: no URL on stdin")


@pytest.mark.parametrize("given", ["notaurl", "ftp://example.org/hook", "https:///no-host", "hooks.slack.com/services/T0/B0/x"])
def test_a_webhook_url_that_is_not_one_is_refused_without_echoing_it(given, monkeypatch, capsys):
    # it was saved, and every alert then failed to send; the value is a credential: never printed
    assert main(["--webhook-url", given]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --webhook-url: not a webhook URL (it must start with https://") and given not in err
    monkeypatch.setenv("SMOLFLOW_ALERT_WEBHOOK_URL", given)
    assert main([]) == 2 and capsys.readouterr().err.startswith("error: SMOLFLOW_ALERT_WEBHOOK_URL: not a webhook URL")
