"""scripts/gpu_run.py where no GPU is: a session lent one has minutes of it, so the script must work
the first time. `--device cpu` runs its code end to end (training as `fit` trains, then every
benchmark of the published profile) on a tiny real-architecture model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ["mmlu", "bbh", "gsm8k", "math", "humaneval"]


def gpu_run(args: list[str], cwd: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_run.py"), *args], cwd=cwd, text=True,
                          check=False, capture_output=True, timeout=timeout,
                          env=os.environ | {"PYTHONPATH": str(ROOT)} | env)


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_on_a_cpu(tiny_model_dir, tmp_path):
    out = tmp_path / "gpu_run.json"
    done = gpu_run(["--device", "cpu", "--threads", "1", "--model", str(tiny_model_dir), "--steps", "4",
                    "--profile-steps", "1", "--limit", "1", "--batch-size", "4", "--out", str(out)], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    training = result["training"]
    assert training["steps"] == 4 and training["timed_steps"] == 1  # the first half is warm-up, the last profiled
    assert "profile of smolflow's last 1 steps, per step: host" in done.stdout and "aten::mm" in done.stdout
    assert "profile of seed's last 1 steps" in done.stdout
    # The profile holds the steps alone: it ends before the evaluation the Trainer runs after the last step.
    assert training["profile"]["evaluations_profiled"] == 0 == result["seed_training"]["profile"]["evaluations_profiled"]
    assert training["tokens_per_s"] > 0 and 0 < training["mfu"] and training["matmul_peak_tflops"] > 0
    assert math.isfinite(training["train_loss"]) and math.isfinite(training["eval_loss"])
    assert training["levers"]["attention"] == "smolflow-packed"  # trained as fit() trains: padding-free rows
    assert (tmp_path / "gpu_run" / "model" / "config.json").exists()  # the tuned model the benchmarks scored
    # The baseline side by side: the seed's SFTConfig (TRL defaults) on the same data, for the same steps.
    seed = result["seed_training"]
    assert seed["config"] == "seed" and seed["steps"] == 4 and seed["tokens_per_s"] > 0
    assert seed["gradient_checkpointing"] and not seed["padding_free"] and seed["levers"]["attention"] == "sdpa"
    assert not training["gradient_checkpointing"] and training["padding_free"]
    assert math.isfinite(seed["held_out_loss"]) and math.isfinite(training["held_out_loss"])
    ratio = training["tokens_per_s"] / seed["tokens_per_s"]
    assert f"| smolflow | {training['bf16_autocast']} | False | True | smolflow-packed | " in done.stdout
    assert f"| {ratio:.2f}x |" in done.stdout
    rows = result["benchmarks"]
    assert [r["benchmark"] for r in rows] == PROFILE
    for r in rows:
        assert r["n"] >= 1 and r["seconds"] > 0 and 0 <= r["score"] <= 1, r
    # Offline: the shipped fixtures, and HumanEval's real problems bundled with its package; the table says which.
    assert [r["data"] for r in rows] == ["fixture"] * 4 + ["bundled"]
    assert f"| gsm8k | fixture | {rows[2]['n']} |" in done.stdout
    assert result["device"].startswith("CPU") and "1 threads" in result["device"]


def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path):
    # GPUs hidden from the script, so this holds on a GPU machine too (there it would start a run).
    done = gpu_run(["--steps", "1"], tmp_path, timeout=120, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 1
    assert "gpu_run.py needs a CUDA GPU" in done.stderr and "--device cpu to check this script" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "gpu_run").exists()  # stopped before anything was made


def test_an_unreachable_hub_ends_in_one_line_with_the_fix(tmp_path):
    """--model auto online with no hub to reach (a closed port here): the error and what to set, no traceback."""
    done = gpu_run(["--device", "cpu", "--threads", "1", "--steps", "4", "--out", str(tmp_path / "r.json")], tmp_path,
                   timeout=300, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9",
                   HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-2:]
    assert "is not in the local Hugging Face cache" in last[0] and "HF_HUB_OFFLINE=1" in last[1]
