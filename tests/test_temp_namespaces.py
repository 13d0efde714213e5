"""A temporary folder shared with another pid namespace (containers on one host sharing /tmp, a
sandbox whose run is pid 1): a run there must not take a live run's folder here for a dead one.
It did: its /proc does not show our pids, so `own_temp_root` deleted the folder of a run still at
work, and W&B failed on its missing files (a soak's nightly failed twice in 20 nights). Real
processes, a real new pid namespace (`unshare`, root); a few seconds."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

OWN = """
import sys
from tasks.leftovers import own_temp_root
print(own_temp_root(), flush=True)
if sys.argv[1] == "wait":
    sys.stdin.read()  # until the test ends (or dies): nothing outlives it
"""


def _env(tmp: Path) -> dict[str, str]:
    return os.environ | {"TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare --pid (root or user namespaces)")
def test_a_run_in_another_pid_namespace_leaves_a_live_runs_temp_folder(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", OWN, "wait"], env=_env(tmp_path), cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        folder = Path(live.stdout.readline().strip())
        assert folder.is_dir() and folder.parent == tmp_path
        # Another run starts in a pid namespace of its own (there it is pid 1; ours are not in its /proc).
        other = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", OWN, "0"],
                               env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert other.returncode == 0, other.stderr[-2000:]
        assert folder.is_dir(), "a run in another pid namespace deleted a live run's temporary folder"
    finally:
        live.kill()
        live.wait()
    # A SIGKILLed run of this namespace (no atexit ran) is still reaped by the next start here.
    assert folder.is_dir()
    subprocess.run([sys.executable, "-c", OWN, "0"], env=_env(tmp_path), cwd=ROOT, check=True, timeout=60)
    deadline = time.monotonic() + 5
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not folder.exists()
