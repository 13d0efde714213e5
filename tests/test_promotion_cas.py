"""Promotion is compare-and-swap: two runs that both passed the gate against the same reference
(here the base model) finish together; the second to promote is compared with the first. Between
them a shared Prefect server's limit, a local root's lock file, or on S3 a conditional PUT.
The concurrent case starts two Python processes (~60 s here under heavy load, a few s unloaded)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from tasks.config import GateConfig
from tasks.gate import promote, regression_gate
from tasks.layout import RunPaths, run_dir
from tasks.pointers import read_pointer, read_pointer_seen
from tasks.storage import ArtifactStore, write_manifest

ROOT = Path(__file__).resolve().parents[1]
FLOW = "smolflow-finetune"
BASE_SCORE = 0.30

PROMOTE = """
import json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from tasks.gate import GateDecision, promote
root, run_id, decision, barrier = sys.argv[1], sys.argv[2], GateDecision.model_validate_json(sys.argv[3]), Path(sys.argv[4])
(barrier / run_id).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.01)
print(json.dumps({"run": run_id, "pointer": promote.fn(root, "smolflow-finetune", run_id, decision, 0.05)}))
"""


def _finished_run(root: str, run_id: str, score: float):
    """A completed run folder whose gate passed against the base model."""
    run = ArtifactStore(root).child(run_dir(run_id))
    for role, value in (("tuned", score), ("base", BASE_SCORE)):
        run.write_json(RunPaths.benchmark_summary("gsm8k", role), {"name": "gsm8k", "score": value, "stderr": 0.0})
    run.write_json(RunPaths.comparison, [{"benchmark": "gsm8k"}])
    decision = regression_gate.fn(root, FLOW, run.uri, GateConfig(tolerance=0.05), [])
    assert decision.promote and decision.reference_run is None
    write_manifest(run.uri, {"run_id": run_id})
    return decision


@pytest.mark.parametrize("between", ["prefect-server", "local-root", "s3-root"])
def test_two_runs_finishing_together_the_second_is_compared_with_the_first(between, tmp_path, request):
    # s3-root: two machines sharing a bucket and nothing else (no server, caches of their own)
    root = request.getfixturevalue("s3_bucket") + "/artifacts" if between == "s3-root" else str(tmp_path / "artifacts")
    decisions = {"good": _finished_run(root, "good", 0.60), "worse": _finished_run(root, "worse", 0.40)}
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = os.environ | {"PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value()}
    envs = [env, env]
    if between != "prefect-server":  # no server, and caches of their own (two users): the root's lock file
        # A rejected promotion posts its decision to Prefect: without a server, to a temporary one,
        # whose start takes over Prefect's default 20 s on a loaded machine.
        env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
        envs = [env | {"SMOLFLOW_CACHE": str(tmp_path / f"cache-{run_id}")} for run_id in decisions]
        if between == "s3-root":  # two machines: machine-wide locks of their own too
            envs = [run_env | {"SMOLFLOW_MACHINE_LOCK": f"machine-{run_id}"}
                    for run_env, run_id in zip(envs, decisions, strict=True)]
    procs = [subprocess.Popen([sys.executable, "-c", PROMOTE, root, run_id, d.model_dump_json(), str(barrier)],
                              cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for (run_id, d), run_env in zip(decisions.items(), envs)]
    outcomes, logs = {}, {}
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        outcomes[result["run"]], logs[result["run"]] = result["pointer"], err
    # Whichever came second re-read `promoted` under the lock and compared with the first.
    rechecked = [run for run, err in logs.items() if "Promotion re-check against promoted run" in err]
    assert len(rechecked) == 1, logs
    second = rechecked[0]
    first = "worse" if second == "good" else "good"
    assert f"re-check against promoted run {first}" in logs[second]
    # Either order ends with the better model promoted; the worse one is rejected if it came second.
    assert read_pointer(root, FLOW, "promoted")["run_id"] == "good"
    if second == "worse":
        assert outcomes["worse"] is None and outcomes["good"] is not None


def test_a_stale_gate_decision_is_rechecked_and_rejected(tmp_path):
    root = str(tmp_path)
    stale = _finished_run(root, "worse", 0.40)  # passed against the base model...
    _finished_run(root, "good", 0.60)
    promote.fn(root, FLOW, "good")  # ...but a better run was promoted before it got there
    assert promote.fn(root, FLOW, "worse", stale, 0.05) is None
    assert read_pointer(root, FLOW, "promoted")["run_id"] == "good"
    # Its folder said "Promoted" (the first decision): the decision, its page and the report's section
    # now say what happened, and the report stitched again (as the flow does) opens with it.
    from tasks.reporting import write_report

    run = ArtifactStore(root).child(run_dir("worse"))
    decision = run.read_json(RunPaths.gate)
    assert not decision["promote"] and decision["reference_run"] == "good" and decision["reasons"], decision
    assert decision["against"].startswith("promoted run good, promoted while this run was scored (re-checked at "
                                          "promotion; its gate had passed against the base model"), decision
    for text in (run.read_text(RunPaths.gate_md), run.read_text(RunPaths.section("gate"))):
        assert "**Not promoted**" in text and "re-checked at promotion" in text, text
    run.write_json(RunPaths.comparison, [])  # the fixture's stub row holds no scores for the summary to list
    write_report.fn(run.uri, {})  # no trend: the other stub runs hold no scores either
    summary = run.read_text(RunPaths.report).split("## Summary\n\n", 1)[1]
    assert summary.startswith("- **Not promoted** (the model is kept in its run folder), compared with the promoted "
                              "run good, promoted while this run was scored"), summary[:300]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_write_if_unchanged_never_overwrites_what_it_did_not_read(where, tmp_path, request):
    store = ArtifactStore(request.getfixturevalue("s3_bucket") + "/r" if where == "s3" else str(tmp_path))
    assert store.read_seen("p.json") == (None, None)
    assert store.write_if_unchanged("p.json", b"one", None)
    assert not store.write_if_unchanged("p.json", b"two", None)  # it exists now: "missing" is stale
    data, seen = store.read_seen("p.json")
    assert data == b"one" and seen
    assert store.write_if_unchanged("p.json", b"three", seen)
    assert not store.write_if_unchanged("p.json", b"four", seen)  # another write came after that read
    assert store.read_bytes("p.json") == b"three"


def test_a_pointer_moved_on_s3_by_another_machine_meanwhile_is_read_again(s3_bucket, monkeypatch):
    """Two machines sharing a bucket, no Prefect server: their locks are their own, so another
    machine promotes a better run between this run's read of `promoted` and its write. The write
    (a conditional PUT) is refused, the pointer read again, and this run compared with that one."""
    from tasks import gate
    from tasks.pointers import set_pointer

    root = s3_bucket + "/artifacts"
    stale = _finished_run(root, "worse", 0.40)  # passed against the base model
    _finished_run(root, "good", 0.60)
    reads = []

    def read_then_another_machine_promotes(*args):
        reads.append(read_pointer_seen(*args))
        if len(reads) == 1:
            set_pointer(root, FLOW, "promoted", "good")  # the other machine, under a lock of its own
        return reads[-1]

    monkeypatch.setattr(gate, "read_pointer_seen", read_then_another_machine_promotes)
    assert promote.fn(root, FLOW, "worse", stale, 0.05) is None
    assert [pointer and pointer["run_id"] for pointer, _ in reads] == [None, "good"]
    assert read_pointer(root, FLOW, "promoted")["run_id"] == "good"


def test_a_store_without_conditional_writes_is_written_as_before_and_says_so(s3_bucket, s3_server, monkeypatch,
                                                                               caplog):
    """An S3-compatible store that answers a conditional PUT with 501 Not Implemented (as before
    AWS had them): the pointer is written as it was before (under the lock alone), with a warning,
    not a failed promotion. Between the store and the client, a proxy that refuses such PUTs."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    upstream = urlsplit(s3_server.endpoint_url)

    class NoConditions(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" before it sends a body

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                pass
            return b"".join(chunks)

        def forward(self):
            body = self.body()
            if self.command == "PUT" and ("If-Match" in self.headers or "If-None-Match" in self.headers):
                answer = b"<Error><Code>NotImplemented</Code><Message>conditional PUT</Message></Error>"
                self.send_response(501)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                return
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body, headers)  # Host as signed: the proxy's
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = forward

        def log_message(self, *args):
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), NoConditions)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        store = ArtifactStore(s3_bucket + "/r")
        with caplog.at_level("WARNING"):
            assert store.write_if_unchanged("p.json", b"one", None)
        assert store.read_bytes("p.json") == b"one"
        assert "does not support conditional writes (NotImplemented): p.json written without the check" in caplog.text
    finally:
        proxy.shutdown()
        proxy.server_close()
