"""scripts/gpu_step.py where no GPU is: it breaks a training step down on the GPU, one change a row,
and a session lent a GPU has minutes of it, so it must work the first time. `--device cpu` runs
every row and both Trainers on a tiny real-architecture model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_step_breakdown_runs_every_row_on_a_cpu(tiny_model_dir, tmp_path):
    out = tmp_path / "gpu_step.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_step.py"), "--device", "cpu", "--threads", "1", "--model",
                           str(tiny_model_dir), "--steps", "1", "--warm", "0", "--profile-steps", "1", "--trainer-steps", "4", "--out", str(out)],
                          cwd=tmp_path, text=True, capture_output=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_step import ROWS

    assert [r["row"] for r in found["rows"]] == list(ROWS)
    for r in found["rows"]:
        assert r["ms"] > 0 and r["tokens"] > 0 and r["host_ms"] > 0, r
        assert r["launches"] == r["syncs"] == r["mallocs"] == 0  # no GPU: nothing launched there
    padded, packed = found["rows"][0]["tokens"], found["rows"][1]["tokens"]
    assert packed < padded  # one padding-free row holds the same conversations without the pads
    smolflow, seed = found["trainers"]
    assert smolflow["row"] == "Trainer (smolflow)" and seed["row"] == "Trainer (seed)"
    assert smolflow["levers"]["attention"] == "smolflow-packed" and seed["levers"]["attention"] == "sdpa"  # on a CPU
    assert smolflow["ms"] > 0 and smolflow["host_ms"] > 0 and seed["tokens_per_s"] > 0
    for row in (*ROWS, "Trainer (smolflow)", "Trainer (seed)"):
        assert f"| {row} | " in done.stdout
