"""`make serve` (python -m deployments.local) as an operator's supervisor sees it: SIGTERM stops
every process it started, the deployments stay active across a restart, a server that dies ends it
all in one line, a server that cannot start shows why, a busy or impossible port and settings that
name a missing file are refused. Real processes, a real `prefect server start`, real signals.
~90-150 s on 2 busy cores: it starts a server four times and imports the flow twice (the price of
testing the real supervisor)."""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from deployments.local import alive, descendants, start_server, stop
from deployments.server_log import TAIL_LINES, cap_log, server_log
from tasks.config_args import port_number, seconds
from tests.conftest import prefect_home

ROOT = Path(__file__).resolve().parents[1]
SMOLFLOW = Path(sys.executable).parent / "smolflow"


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
    port, home, log = _free_port(), prefect_home(tmp_path / "home"), tmp_path / "serve.log"
    api = f"http://127.0.0.1:{port}/api"
    with open(log, "wb") as out:
        parent = subprocess.Popen([sys.executable, "-m", "deployments.local", "--port", str(port),
                                   "--startup-timeout", "600"],
                                  cwd=ROOT, env=_env(home), stdout=out, stderr=subprocess.STDOUT)
    try:
        nightly = _wait_for_deployments(api, 900, log, parent)
        assert not nightly.paused
        # Said at the start: when the nightly runs next (by Prefect's cron arithmetic) and where runs go
        now = datetime.now(timezone.utc)
        due = now.replace(hour=2, minute=0, second=0, microsecond=0)
        due += timedelta(days=1) if due <= now else timedelta()
        said = f"Nightly: '0 2 * * *' (UTC), next run {due:%Y-%m-%d} 02:00 UTC; runs go to ./smolflow-runs (from {ROOT})"
        assert said in log.read_text(), log.read_text()[-3000:]
        children = descendants(parent.pid)  # the server, the serve process and all of theirs
        assert len(children) >= 2, children
        # Started as `python -m deployments.local`, the server too deletes finished flow runs after 90 days
        (server,) = [pid for pid in children if b"deployments.prefect_server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
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


def test_a_busy_or_impossible_port_is_an_error_not_an_attachment(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "deployments.local", "--port", str(port)], cwd=ROOT,
                             env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr and "--port" in out.stderr
    assert "Traceback" not in out.stderr
    # No port at all: an OverflowError traceback at bind (exit 1) before; refused as the arguments are read.
    # A wait that is no wait: once the server was started, then "did not answer within -5 s".
    for flag, value, says in (("--port", "70000", "is not a port: give a number from 1 to 65535"),
                              ("--startup-timeout", "-5", "is not a number of seconds: give a number above 0, e.g. 300")):
        out = subprocess.run([str(SMOLFLOW), "serve", flag, value], cwd=ROOT, env=_env(tmp_path / "home"),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr == f"error: argument {flag}: '{value}' {says}\n", out.stderr
    for check, values in ((port_number, ("-5", "abc", "0")), (seconds, ("0", "nan", "inf", "soon"))):
        for value in values:  # the same argument types, each value read as that subprocess reads it
            with pytest.raises(argparse.ArgumentTypeError, match=f"^'{value}' is not a "):
                check(value)


def test_a_bad_nightly_setting_is_an_error_before_the_server_starts(tmp_path):
    # `python -m deployments.local` with settings, as `make serve ARGS=...` passes them (a typo too).
    out = subprocess.run([sys.executable, "-P", "-m", "deployments.local", "--port", str(_free_port()), "--prot", "4201"],
                         cwd=tmp_path, env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: flag --prot: prot: unknown setting"), out.stderr
    assert not (tmp_path / "home").exists()  # no server was started (it would have made its database there)
    # Well-formed settings that name a missing file: checked as `smolflow run` checks them, or every
    # nightly failed on it. (The home is made by Prefect's import now; the server would add its database.)
    port = _free_port()
    out = subprocess.run([str(SMOLFLOW), "serve", "--port", str(port), "--data.dataset", "./nofile.jsonl"],
                         cwd=tmp_path, env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=60)
    said = "error: flag --data.dataset: data.dataset='./nofile.jsonl': no such file or directory"
    assert out.returncode == 2 and out.stderr.startswith(said) and out.stderr.count("\n") == 1, out.stderr
    assert "Prefect" not in out.stdout and not list((tmp_path / "home").glob("*.db"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # no server was started


@pytest.mark.slow
def test_a_server_that_dies_stops_everything_at_once_in_one_line(tmp_path):
    """kill -9 of the server (or the OOM killer): the supervisor waited on the serve process alone, beside
    a defunct server, for ~4 minutes, then the runner died in a 200-line traceback. Now: one line, every
    process stopped, exit status 1 for a restart policy. Its log is where the start said."""
    port, home, log = _free_port(), prefect_home(tmp_path / "home"), tmp_path / "serve.log"
    with open(log, "wb") as out:
        parent = subprocess.Popen([sys.executable, "-m", "deployments.local", "--port", str(port),
                                   "--startup-timeout", "600"],
                                  cwd=ROOT, env=_env(home), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_deployments(f"http://127.0.0.1:{port}/api", 900, log, parent)
        assert f"Prefect server log: {home / 'smolflow-server.log'}\n" in log.read_text()
        assert "Check out the dashboard" in (home / "smolflow-server.log").read_text()  # the server's own output
        children = descendants(parent.pid)
        (server,) = [pid for pid in children if b"deployments.prefect_server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(server, signal.SIGKILL)
        assert parent.wait(timeout=30) == 1, log.read_text()[-3000:]  # before: up to ~4 minutes
        _all_gone(children, 10, log)
        said = f"error: the Prefect server exited (killed by SIGKILL); stopping the deployments. Its log: {home}"
        assert said in log.read_text() and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_server_that_cannot_start_says_why(tmp_path):
    """Its output went nowhere: an unusable PREFECT_HOME said only `prefect server exited with code 3`.
    Its log (here in the temp folder, as the home cannot be made) ends the error, a few lines of it."""
    env = _env(tmp_path) | {"PREFECT_HOME": "/dev/null/prefect", "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "deployments.local", "--port", str(_free_port())], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    log = out.stdout.split("Prefect server log: ")[1].split("\n")[0]
    assert log.startswith(f"{tmp_path}/smolflow-prefect-server-")
    assert not list(tmp_path.glob("smolflow-prefect-server-*"))  # shown below, then not left in the temp folder
    line = f"error: the Prefect server exited with code 3 before answering; its log: {log}\n"
    assert line in out.stderr, out.stderr
    tail = out.stderr.split(line)[1].splitlines()
    assert 0 < len(tail) <= TAIL_LINES and "unable to open database file" in "\n".join(tail), out.stderr


def test_the_server_log_stays_bounded_over_months_of_restarts(tmp_path):
    """Each start keeps the previous start's log as .1 (the crash a restart followed); one long run
    caps its log in place, and the server's appends land at the new end, not past a hole."""
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path)}):
        for night in ("first", "second", "third"):
            (log := server_log()).write_text(night)
    assert (log.read_text(), Path(f"{log}.1").read_text()) == ("third", "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smolflow-server.log", "smolflow-server.log.1"]
    with open(log, "ab", buffering=0) as server:  # as the server holds it
        server.write(b"x" * 100)
        cap_log(log, limit=50)
        server.write(b"after")
    assert (log.read_bytes(), Path(f"{log}.1").read_bytes()) == (b"after", b"third" + b"x" * 100)


LOST_SERVER = """
import logging
from websockets.exceptions import ConnectionClosedError
from deployments.serve import lost_server_in_one_line

lost_server_in_one_line()
log = logging.getLogger("prefect.FlowRunCancellingObserver")
for err in (ConnectionClosedError(None, None), ValueError("a bug")):
    try:
        raise err
    except Exception:
        log.warning("The %s websocket failed with an exception.", "FlowRunCancellingObserver", exc_info=True)
"""


def test_a_lost_server_is_one_line_in_the_serve_log(tmp_path):
    """kill -9 of the server: in the moment before the supervisor stopped serve, Prefect's cancellation
    observer logged its websocket's 30-line traceback (seen under load, 1 run in 3 here). A lost
    connection is one line; any other error keeps its traceback."""
    out = subprocess.run([sys.executable, "-c", LOST_SERVER], cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    said = out.stdout + out.stderr  # (Prefect's console handler writes to stderr)
    assert ("websocket failed with an exception. (ConnectionClosedError: no close frame received or sent)\n"
            in said), said
    assert said.count("ConnectionClosedError") == 1 and said.count("Traceback") == 1 and "ValueError: a bug" in said


def test_a_server_gone_as_the_deployments_start_is_one_line_of_their_own(tmp_path):
    """kill -9 of the server as the serve process starts (CI caught it between the deployments'
    registration and the runner's start): the runner's RuntimeError, wrapped around its event
    emitter's websocket error, came out as a 60-line traceback under the supervisor's one line. Now one
    line of its own, exit status 1; an error that is not about the server keeps its traceback."""
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    from deployments.serve import lost_server

    # Nothing answers where its server was: the first call, the runs' locks, meets it.
    out = subprocess.run([sys.executable, "-m", "deployments.serve"], cwd=ROOT, capture_output=True, text=True,
                         env=_env(tmp_path) | {"PREFECT_API_URL": "http://127.0.0.1:9/api"}, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        "error: the deployments stopped: the Prefect server stopped answering (ConnectError: [Errno 111] Connection refused)"]
    # The runner's own start: a websocket to a port where what answers is no HTTP any more, as Prefect's
    # Runner wraps it ("Runner failed to start: event_emitter — did not receive a valid HTTP response").
    with socket.socket() as dying:
        dying.bind(("127.0.0.1", 0))
        dying.listen(1)
        closer = threading.Thread(target=lambda: dying.accept()[0].close())  # a server going: it answers nothing
        closer.start()
        with pytest.raises(WebSocketException) as met:  # ConnectionClosedError here; InvalidMessage in CI's case
            with connect(f"ws://127.0.0.1:{dying.getsockname()[1]}", open_timeout=30):
                pass
        closer.join()
    try:
        raise RuntimeError(f"Runner failed to start: event_emitter — {met.value}") from met.value
    except RuntimeError as wrapped:
        assert lost_server(wrapped)
    try:
        raise RuntimeError("Runner failed to start: a bug") from ValueError("a bug")
    except RuntimeError as other:
        assert not lost_server(other)


# What a SIGTERM during the supervisor's fork of the server does: the handler runs at the entry of
# logging's at-fork hook (Python code, run because the Popen has a preexec_fn), and the fork's C code
# prints its KeyboardInterrupt and drops it. Here a hook of the test's runs the handler there, once.
STOP_DROPPED_BY_A_FORK = """
import os, signal, sys
from deployments import local
fired = []

def stopped_during_the_fork():
    if not fired:
        fired.append(True)
        local._stop_on_signal(signal.SIGTERM, None)

os.register_at_fork(after_in_parent=stopped_during_the_fork)
local.main(sys.argv[1:])
"""


def test_a_stop_that_lands_in_the_servers_fork_still_stops_serve(tmp_path):
    """The stop was lost: the supervisor started the server and served on, for good."""
    port, home, log = _free_port(), prefect_home(tmp_path / "home"), tmp_path / "serve.log"
    with open(log, "wb") as out:
        parent = subprocess.Popen([sys.executable, "-c", STOP_DROPPED_BY_A_FORK, "--port", str(port),
                                   "--startup-timeout", "600"], cwd=ROOT, env=_env(home), stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        code = parent.wait(timeout=60)
        said = log.read_text()
        assert "Exception ignored in" in said and "KeyboardInterrupt" in said, said[-3000:]  # the drop itself
        assert code == 0 and "Prefect UI:" not in said, said[-3000:]  # stopped before serving anything
        assert not _servers_on(port)  # the server it had started went with it (its own session: not a child any more)
    finally:
        if parent.poll() is None:
            for pid in descendants(parent.pid):
                os.kill(pid, signal.SIGKILL)
            parent.kill()
            parent.wait()


def _servers_on(port: int) -> list[int]:
    """Pids of `deployments.prefect_server` processes serving `port`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if b"deployments.prefect_server" in argv and str(port).encode() in argv:
            found.append(int(entry.name))
    return found
