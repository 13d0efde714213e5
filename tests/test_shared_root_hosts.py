"""Two machines with the same hostname on one S3 root (cloned VMs, containers given one --hostname):
a run at work on machine A must not look "killed" to machine B, whose gc then stripped the live
run's checkpoints (tasks/leftovers.py process_gone). Machine A is a real process in its own UTS,
mount and pid namespaces, with the same hostname and another boot id (bind-mounted over
/proc/sys/kernel/random/boot_id, as another kernel would have)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.leftovers import process_gone, process_mark
from tasks.run_table import list_runs
from tasks.runs import status_recorded
from tasks.storage import ArtifactStore
from tests.conftest import prefect_home

ROOT = Path(__file__).resolve().parents[1]

# A run at work until its stdin closes (the test's end, or death, ends it): nothing outlives the test.
HOLDER = ("import sys; from tasks.runs import status_recorded; from tasks.storage import ArtifactStore\n"
          "run = ArtifactStore(sys.argv[1]).child('runs', sys.argv[2]); run.write_json('config.json', {})\n"
          "with status_recorded(run):\n"
          "    run.write_bytes('checkpoints/checkpoint-2/model.safetensors', b'x' * 4096)\n"
          "    run.write_text('checkpoints/checkpoint-2/COMPLETE', '')\n"
          "    print('in', flush=True); sys.stdin.read()\n")


def test_a_reboot_is_told_from_another_machine_of_the_same_name():
    mark = process_mark() | {"boot_id": "another-boot"}
    assert process_gone(mark) is None  # written after this machine booted: not an earlier boot of it
    assert process_gone(mark | {"marked_at": 1.0}) is True  # written before it booted: restarted since


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_gc_keeps_checkpoints_of_a_live_run_on_a_machine_with_the_same_name(s3_bucket: str, tmp_path: Path):
    root = s3_bucket + "/smolflow"
    boot = tmp_path / "boot_id"
    boot.write_text("0123456789abcdef0123456789abcdef\n")
    inner = (f"hostname {socket.gethostname()} && mount --bind {boot} /proc/sys/kernel/random/boot_id && "
             f'exec "$0" -c "$1" "$2" "$3"')
    a = subprocess.Popen(["unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c", inner,
                          sys.executable, HOLDER, root, "a-live"], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline() == "in\n"
        # Machine B: a newer night that failed, with checkpoints of its own.
        run_b = ArtifactStore(root).child("runs", "b-failed")
        with pytest.raises(RuntimeError), status_recorded(run_b):
            run_b.write_bytes("checkpoints/checkpoint-2/model.safetensors", b"y" * 1024)
            raise RuntimeError("out of data")
        rows = {r["run_id"]: r for r in list_runs(root)}
        assert rows["a-live"]["status"] == "incomplete", rows["a-live"]  # was: failed (killed ... restarted)
        assert "which cannot tell" in rows["a-live"]["why"]
        gc = subprocess.run([str(Path(sys.executable).parent / "smolflow"), "gc", "--root", root],
                            capture_output=True, text=True, timeout=180, cwd=ROOT,
                            env=dict(os.environ, SMOLFLOW_CACHE=str(tmp_path / "cache-b")))
        assert gc.returncode == 0, gc.stderr
        assert "a-live/checkpoints" not in gc.stdout, gc.stdout
        assert "checkpoints/checkpoint-2/COMPLETE" in ArtifactStore(root).child("runs", "a-live").list_files()
    finally:
        a.stdin.close()
        a.wait(timeout=60)


# A flow whose process is PID 1 of its pid namespace (a container's entrypoint: `docker run IMAGE
# smolflow run`), reaping orphaned servers first thing as flows/finetune.py does.
PID1_FLOW = """
import json, os, sys
from prefect import flow
from tasks.leftovers import reap_orphaned_servers

@flow
def first_thing():
    print(json.dumps({"pid": os.getpid(), "reaped": reap_orphaned_servers()}), flush=True)

first_thing()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_run_as_pid_1_never_reaps_its_own_temporary_server(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(prefect_home(tmp_path / "prefect-home")), "PYTHONPATH": str(ROOT),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID1_FLOW], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    said = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert said, done.stdout[-2000:] + done.stderr[-3000:]
    # Was: {"pid": 1, "reaped": [<its own server>]}, and the run died on "All connection attempts failed".
    assert json.loads(said[0]) == {"pid": 1, "reaped": []}, done.stderr[-3000:]
