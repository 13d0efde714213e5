"""A SIGKILLed flow leaves its temporary Prefect server behind (Prefect stops it at exit, which a
SIGKILL skips); the next run reaps it. W&B's service exits with its parent by itself.
Slow-ish (~15-30 s): a real temporary server has to start in the killed process."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.local import descendants
from tasks.leftovers import SERVER_MARK, _running, orphaned_servers, reap_orphaned_servers
from tests.conftest import prefect_home

ROOT = Path(__file__).resolve().parents[1]

FLOW = """
import sys, time
from pathlib import Path
from prefect import flow

@flow
def wait():
    Path(sys.argv[1]).touch()
    time.sleep(600)

wait()
"""


def _wait_for(ready: Path, proc: subprocess.Popen, seconds: float, never: str) -> None:
    """Until `proc` touches `ready`; fails with its stderr if it exits first."""
    deadline = time.monotonic() + seconds
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, never
        time.sleep(0.2)


def _flow_with_its_server(tmp_path: Path, script: str) -> tuple[subprocess.Popen, list[int]]:
    """A flow process started with `script`, once its flow runs: (process, its temporary server's pids)."""
    home, ready = prefect_home(tmp_path / "prefect-home"), tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(ready)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(ready, proc, 400, "the flow never started")
        servers = [pid for pid in descendants(proc.pid) if SERVER_MARK in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert servers, "the flow runs without a temporary server"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, servers


@pytest.mark.slow
def test_a_killed_flows_temporary_server_is_reaped_at_the_next_start(tmp_path):
    home = tmp_path / "prefect-home"
    proc, servers = _flow_with_its_server(tmp_path, FLOW)
    try:
        assert orphaned_servers(str(home)) == []  # its parent lives: not an orphan, never touched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)

    assert sorted(orphaned_servers(str(home))) == sorted(servers)  # outlived the killed flow
    assert orphaned_servers(str(tmp_path / "another-home")) == []  # another project's are not ours
    assert sorted(reap_orphaned_servers(str(home))) == sorted(servers)
    assert not any(_running(pid) for pid in servers)


def orphaned_temporary_server(home: Path, lives_s: int = 600) -> int:
    """A stand-in for a temporary Prefect server of PREFECT_HOME `home` whose run was SIGKILLed: a
    real process with what `orphaned_servers` reads (the server's module in its command line, the
    ephemeral-server variable, PID 1 as its parent), for tests of *who* reaps, where starting a real
    server costs ~25 s more (what a real one looks like: the tests above and the arena's below).
    It sleeps `lives_s`, longer than any such test, so only a reaping ends it; the caller kills it
    in a `finally`. Its pid."""
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT__SERVER_EPHEMERAL="1")
    sleeper = f"{sys.executable} -c 'import time; time.sleep({lives_s})' {SERVER_MARK.decode()}"
    pid = int(subprocess.run(["sh", "-c", sleeper + " >/dev/null 2>&1 & echo $!"], env=env, capture_output=True,
                             text=True, check=True).stdout)
    assert pid in orphaned_servers(str(home)), "not an orphan of PID 1 (a subreaper adopted it?)"
    return pid


def kill(*pids: int) -> None:
    """SIGKILL each of `pids` still there (a test's `finally`)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already (or never ours)
            pass


@pytest.mark.slow
def test_the_arena_flow_reaps_them_too(tmp_path):
    """Every flow's start stops what a killed run left (tasks/bookkeeping.py begin_run): the
    fine-tune's, `smolflow eval`'s (tests/test_cli_eval.py) and the arena's. Here a real temporary
    server, left by a flow SIGKILLed while it ran."""
    home = tmp_path / "prefect-home"
    proc, servers = _flow_with_its_server(tmp_path, FLOW)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    code = ("from flows.arena import arena\nfrom tasks.arena_config import ArenaConfig\ntry:\n"
            "    arena.fn(ArenaConfig(prompts='missing.jsonl', judge={'enabled': False}, torch_threads=1))\n"
            "except ValueError as err:\n    print(err)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    try:
        assert sorted(orphaned_servers(str(home))) == sorted(servers)  # outlived its flow
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env=env | {"PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT)})
        assert "missing.jsonl" in done.stdout, done.stderr[-3000:]  # stopped at its prompts, after its start
        assert f"Stopped {len(servers)} temporary Prefect server(s) left by a killed run" in done.stdout + done.stderr, \
            done.stdout + done.stderr[-3000:]
        assert not any(_running(pid) for pid in servers)
    finally:
        kill(*servers)


@pytest.mark.slow
def test_a_background_server_someone_started_is_never_reaped(tmp_path):
    # `prefect server start --background` leaves a uvicorn with the same command line, re-parented
    # to PID 1: every `smolflow run` stopped it (and, on port 4200, the server the run itself used).
    home = prefect_home(tmp_path / "prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_HOME": str(home)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefect = [sys.executable, "-m", "prefect", "server"]
    subprocess.run([*prefect, "start", "--background", "--port", str(port)], env=env, cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)
    try:
        deadline = time.monotonic() + 300
        while not (servers := [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                               if _is_server_of(pid, home)]):
            assert time.monotonic() < deadline, "the background server never started"
            time.sleep(0.5)
        assert reap_orphaned_servers(str(home)) == [] and all(_running(pid) for pid in servers)
    finally:
        subprocess.run([*prefect, "stop"], env=env, cwd=tmp_path, capture_output=True, timeout=120)


def _is_server_of(pid: int, home: Path) -> bool:
    try:
        return (SERVER_MARK in Path(f"/proc/{pid}/cmdline").read_bytes()
                and f"PREFECT_HOME={home}".encode() in Path(f"/proc/{pid}/environ").read_bytes())
    except OSError:
        return False


@pytest.mark.slow
def test_a_sigterm_stops_the_flow_and_its_temporary_server(tmp_path):
    # `smolflow` calls exit_on_termination first: `kill` (systemd, docker, a closed terminal) then
    # unwinds the process as Ctrl-C does, and Prefect's exit hook stops the server.
    script = "from tasks.leftovers import exit_on_termination\nexit_on_termination()\n" + FLOW
    proc, servers = _flow_with_its_server(tmp_path, script)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_running(pid) for pid in servers), "the temporary server outlived its flow"
    assert orphaned_servers(str(tmp_path / "prefect-home")) == []


# The program only has to outlive the moment its run is SIGKILLed (~seconds in); the limit bounds
# it should the test fail before the kill.
SANDBOXED = """
from tasks.sandbox import Limits, run_python
run_python("import time; time.sleep(60)", Limits(timeout_s=60))
"""


def test_a_killed_runs_sandbox_folder_goes_when_the_next_is_made(tmp_path, monkeypatch):
    # A HumanEval program runs in a throwaway folder; a SIGKILL of its run skips the cleanup, so the
    # folder (program, output) would stay in $TMPDIR for good: the next sandbox removes it.
    import tempfile

    from tasks.leftovers import temp_dir

    env = os.environ | {"TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SANDBOXED], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    program: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while not (left := list(tmp_path.glob(f"smolflow-sandbox-{proc.pid}-*/program.py"))) or not program:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the sandboxed program never started"
            program = descendants(proc.pid)  # the sandbox and the program it runs
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        # The sleeping program dies with its run (PR_SET_PDEATHSIG), not 60 s later.
        deadline = time.monotonic() + 10
        while alive := [pid for pid in program if _running(pid)]:
            assert time.monotonic() < deadline, f"sandboxed processes outlived their killed run: {alive}"
            time.sleep(0.2)
    finally:
        for pid in [proc.pid, *program]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()
    assert left[0].exists()  # what the killed run left
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with temp_dir("sandbox") as mine:
        assert not left[0].parent.exists()  # the dead run's folder is gone
        assert Path(mine).name.startswith(f"smolflow-sandbox-{os.getpid()}-")
    assert not list(tmp_path.iterdir())  # and this one went at its end, as before


TEMP_USER = """
import sys, time
from pathlib import Path
from tasks.leftovers import own_temp_root
own_temp_root()
import wandb  # makes tmp*wandb-media and tmp*wandb-artifacts at import, removed only at a clean exit
Path(sys.argv[1]).touch()
time.sleep(float(sys.argv[2]))
"""


def test_a_killed_processs_temporary_files_go_when_the_next_starts(tmp_path):
    # wandb's import-time folders (and lm-eval's, datasets') outlived a SIGKILL in $TMPDIR for good.
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", TEMP_USER, str(ready), "600"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE)
    try:
        _wait_for(ready, proc, 120, "the process never got going")
    finally:
        proc.kill()
        proc.wait()
    (left,) = temp.iterdir()  # everything it made is in one folder named after it
    assert left.name.startswith(f"smolflow-tmp-{proc.pid}-")
    assert {p.name.split("wandb-")[-1] for p in left.glob("tmp*wandb-*")} == {"media", "artifacts"}
    ready.unlink()
    done = subprocess.run([sys.executable, "-c", TEMP_USER, str(ready), "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ready.exists()
    assert not list(temp.iterdir())  # the killed one's folder went at the start, its own at its exit


def test_stop_processes_waits_then_terms_then_kills_only_those_it_noted():
    """tasks/ray_scoring.py stops what of a local Ray cluster outlives ray.shutdown() this way: a
    grace, SIGTERM, SIGKILL; a pid noted with another start time (reused) is never signalled."""
    from tasks.leftovers import alive, stop_processes, with_start_times

    # Each waits on its stdin: when the test ends (or dies) they end too.
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print(flush=True); sys.stdin.read()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    polite = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
    other = subprocess.Popen(["cat"], stdin=subprocess.PIPE)  # stands for a process that got a noted pid after it
    try:
        stubborn.stdout.readline()  # its handler is in place
        noted = with_start_times([stubborn.pid, polite.pid]) | {other.pid: "1"}
        started = time.monotonic()
        signalled, left = stop_processes(noted, grace=0.3, kill_after=0.5)
        took = time.monotonic() - started
        assert sorted(signalled) == sorted([stubborn.pid, polite.pid]) and left == []
        assert stubborn.wait(5) == -signal.SIGKILL and polite.wait(5) == -signal.SIGTERM
        assert 0.7 < took < 5 and alive({other.pid: with_start_times([other.pid])[other.pid]})
        assert stop_processes({}, grace=30) == ([], [])  # nothing to wait for: back at once
    finally:
        for proc in (stubborn, polite, other):
            proc.kill()
            proc.wait()
