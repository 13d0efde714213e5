"""A run stopped (SIGTERM) while scoring on a real local Ray cluster ends 'stopped', as anywhere else,
and leaves nothing behind. Apart from test_ray.py so that pytest-xdist runs the two side by side."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tasks.leftovers import processes_under


@pytest.mark.slow
@pytest.mark.parametrize("when", ["scoring", "starting"])
def test_a_sigterm_while_scoring_on_ray_stops_the_run_as_anywhere_else(tiny_model_dir, tmp_path, when):
    """ray.init() replaces the run's SIGTERM handler with its own sys.exit: a cancel in Prefect or a
    stopped worker while scoring on Ray ended the run 'failed (SystemExit: 1)', exit 1. As a
    sequential run: 'stopped', exit 143, and nothing of the cluster left. `starting`: the SIGTERM
    comes while ray.init() starts the cluster (4-5 s here; once its session folder is there), which
    left that folder for good (tasks/ray_scoring.py _half_started)."""
    import json
    import signal
    import subprocess
    import sys
    import threading
    import time

    from prefect.settings import PREFECT_API_URL

    root = Path(__file__).resolve().parents[1]
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: unix socket paths are limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_SERVICE")}
    temp = tmp_path / "tmp"  # the run's and its Ray workers' temporary files
    temp.mkdir()
    env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(root), "RAY_TMPDIR": ray_tmp, "TMPDIR": str(temp)}
    bench = json.dumps([{"name": "gsm8k", "limit": 8, "batch_size": 1}])
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "smolflow"), "--verbose", "eval", "--model", str(tiny_model_dir),
         "--benchmarks", bench, "--execution.task-runner", "ray", "--execution.ray-num-cpus", "2",
         "--execution.item-shards", "4", "--execution.precision", "fp32", "--judge.enabled", "false",
         "--wandb.mode", "disabled", "--output.artifacts-uri", str(tmp_path / "runs-root"), "--output.run-id", "stopped-on-ray"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sessions = Path(ray_tmp) / "ray"

    def due() -> bool:
        if when == "scoring":  # the log line comes once Ray is up and the run's handler is back
            return any("benchmark tasks on Ray" in line for line in seen)
        return sessions.is_dir() and any(sessions.glob("session_2*"))

    try:
        deadline = time.monotonic() + 300
        while not due() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        signalled = due() and proc.poll() is None  # (the session folder goes with the stop)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        out = "".join(seen)
        assert signalled, out[-3000:]
        assert proc.returncode == 143, out[-3000:]
        status = json.loads((tmp_path / "runs-root/runs/stopped-on-ray/status.json").read_text())
        assert status["state"] == "stopped" and status["why"].startswith("stopped by SIGTERM"), status
        # No wait: the run stops every process of its cluster before it exits (tasks/ray_scoring.py)
        assert not (left := processes_under(ray_tmp)), f"Ray processes left after the stop: {left}"
        assert sorted(p.name for p in (Path(ray_tmp) / "ray").iterdir()) == [], f"a Ray session folder was left: {out[-4000:]}"
        # The killed workers' temporary files (datasets' Arrow files) go when the next smolflow process starts.
        reap = "from tasks.leftovers import own_temp_root; own_temp_root()"
        subprocess.run([sys.executable, "-c", reap], cwd=root, env=env, check=True, timeout=60)
        assert sorted(p.name for p in temp.iterdir()) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_cancel_while_scoring_on_ray_can_be_acknowledged():
    """Prefect acknowledges a cancel only while its own SIGTERM handler is installed; else the served
    run ends Crashed, not Cancelled. ray.init() installs Ray's (sys.exit) first thing, and the run
    put back a wrapper of its own: no cancel while scoring on Ray was acknowledged. Now the run's
    handler stays, and what it raises inside Ray's wait (a SystemError caused by it) comes out as
    itself. Prefect's check is the one its control listener makes, in a thread as here."""
    import signal
    import sys
    import threading
    import time

    from prefect.exceptions import TerminationSignal
    from prefect.utilities.engine import capture_sigterm, commit_control_intent_and_ack
    from ray._private import utils as ray_utils

    from tasks.ray_scoring import stops_kept
    from tasks.run_ending import ending_enforced

    def acknowledged() -> bool:  # asked from another thread, as Prefect's listener asks
        answer = []
        listener = threading.Thread(target=lambda: answer.append(commit_control_intent_and_ack(
            commit_intent=lambda: None, clear_intent=lambda: None, send_ack=lambda: None)))
        listener.start()
        listener.join()
        return answer == [True]

    with capture_sigterm():  # as in a flow run
        assert acknowledged()
        with pytest.raises(TerminationSignal) as stopped, stops_kept() as keep:
            ray_utils.set_sigterm_handler(lambda signum, _frame: sys.exit(signum))  # ray.init()'s first step
            assert acknowledged()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # replaced some other way
            keep()
            assert acknowledged()
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the runner's, after the acknowledgement
                time.sleep(5)  # cut short by the handler's exception: it lands at once on a pass
                pytest.fail("the SIGTERM raised nothing within 5 s")
            except TerminationSignal as err:
                raise SystemError("<built-in method __new__> returned a result with an exception set") from err
        assert isinstance(stopped.value.__cause__, SystemError)
        assert acknowledged()

        # The SIGTERM landing in prefect-ray's submit, inside pydantic's serializer: pydantic's own
        # error names it, its cause lost (CI: the run ended 'failed', exit 2). The run's block noted it.
        with ending_enforced(), pytest.raises(TerminationSignal) as stopped, stops_kept() as keep:
            keep()
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # cut short by the handler's exception, as above
                pytest.fail("the SIGTERM raised nothing within 5 s")
            except TerminationSignal:
                pass  # swallowed where it landed, as pydantic's serializer does (it raises its own below)
            raise RuntimeError("Error calling function `_ser_model`: TerminationSignal: ")  # no cause, no context
        assert isinstance(stopped.value.__cause__, RuntimeError)
