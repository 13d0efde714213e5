"""One tiny run as a user starts it (`smolflow run --config run.yaml`, its own process),
with LoRA, a scheduler, an optimizer, sft_args and the W&B model on: a quiet console with progress
lines; base and tuned task runs told apart; a merged model; a W&B run that carries its files.

The run takes ~60-90 s on 2 idle cores (a whole flow in a fresh process: imports, the Prefect
client, training, gsm8k twice, the judge); it is done once for the module's tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def user_run(tiny_model_dir, tmp_path_factory):
    from prefect.settings import PREFECT_API_URL

    tmp = tmp_path_factory.mktemp("user-run")
    config = {
        "model": str(tiny_model_dir),
        "data": {"dataset": "fixture:everyday-conversations", "max_train_rows": 16, "max_test_rows": 4},
        "training": {"max_steps": 2, "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "max_length": 128,
                     "lr_scheduler_type": "cosine", "weight_decay": 0.01, "optim": "adamw_torch",
                     "peft": {"r": 4, "alpha": 8, "target_modules": ["all-linear"]},
                     "sft_args": {"max_grad_norm": 0.5}},
        "sampling": {"prompts": ["Hello! How are you?"], "max_new_tokens": 4},
        "benchmarks": [{"name": "gsm8k", "limit": 1, "batch_size": 1}],
        "judge": {"model": str(tiny_model_dir), "limit": 1, "max_new_tokens": 4},  # imports alpaca_eval
        "output": {"artifacts_uri": str(tmp / "artifacts"), "run_id": "user-run"},
        "wandb": {"mode": "offline", "log_model": True},
        "torch_threads": 1,
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "SMOLFLOW_VERBOSE": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-5000:]
    return tmp / "artifacts" / "runs" / "user-run", out.stdout + out.stderr


@pytest.mark.slow
def test_console_is_quiet_and_shows_progress(user_run):
    _, console = user_run
    for noise in ("httpx", "HTTP Request", "`pretrained` model kwarg", "Loading weights", "Writing model shards",
                  "{'loss': '", "it/s]", "examples/s]"):
        assert noise not in console, f"{noise!r} in the console"
    lines = console.splitlines()
    assert any("Training steps: 0% (step 0 of 2)" in line for line in lines)
    assert any("Training steps: 100% (step 2 of 2, train loss" in line for line in lines)
    assert any("Benchmarks scored: 50% (gsm8k: scoring the tuned model), ETA" in line for line in lines)
    assert any("Benchmarks scored: 100%" in line and "done in" in line for line in lines)


def test_benchmark_task_runs_tell_base_from_tuned(user_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="benchmark-gsm8k-")))
    names = {r.name for r in runs}
    assert {"benchmark-gsm8k-base", "benchmark-gsm8k-tuned"} <= names


def test_lora_run_publishes_a_merged_model_and_records_the_trainer_settings(user_run):
    from transformers import AutoModelForCausalLM

    run, _ = user_run
    assert not (run / "model" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert not any("lora" in name for name in model.state_dict())
    args = json.loads((run / "training" / "trainer_args.json").read_text())
    assert (args["lr_scheduler_type"], args["weight_decay"], args["optim"], args["max_grad_norm"]) == (
        "cosine", 0.01, "adamw_torch", 0.5)
    assert json.loads((run / "config.json").read_text())["training"]["peft"]["r"] == 4


def _records(offline: Path) -> list[dict]:
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb), "leet", "inspect", "--json", str(offline)],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_wandb_run_carries_report_tables_curves_model_and_gate(user_run):
    run, _ = user_run
    (offline,) = (run / "wandb").glob("offline-run-*")  # the copy in the run folder, as synced later
    records = _records(offline)

    saved = {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}
    for name in ("report/report.md", "training/curves.png", "training/log_history.json",
                 "benchmarks/comparison.json", "benchmarks/gsm8k/tuned.jsonl", "gate/decision.json"):
        assert f"smolflow/{name}" in saved
        assert (offline / "files" / "smolflow" / name).read_bytes() == (run / name).read_bytes()
    assert not any(p.startswith(("smolflow/model/", "smolflow/wandb/")) for p in saved)
    tables = [p for p in saved if p.startswith("media/table/samples_")]
    assert tables and (offline / "files" / tables[0]).is_file()

    # Logged tables and the model are real files staged inside the W&B run's folder, never
    # references to paths elsewhere.
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert {"model", "run_table"} <= {a["type"] for a in artifacts}
    for artifact in artifacts:
        for entry in artifact["manifest"]["contents"]:
            assert "ref" not in entry
            assert f"/{offline.name}/staging/" in entry["local_path"]
            assert (offline / entry["local_path"].split(f"/{offline.name}/", 1)[1]).is_file()
    model = next(a for a in artifacts if a["type"] == "model")
    assert "model.safetensors" in {e["path"] for e in model["manifest"]["contents"]}
    # Uploaded without a copy into W&B's artifact cache, which W&B empties only when the disk is full.
    assert all(e.get("skip_cache") is True for e in model["manifest"]["contents"])

    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary |= {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v
                        for k, v in r["summary"]["update"].items()}
    decision = json.loads((run / "gate" / "decision.json").read_text())
    assert summary["gate/against"] == decision["against"]
    assert summary["gate/reasons"] == decision["reasons"]
    assert summary["gate/passed"] is decision["promote"]


def test_replayed_rows_are_keyed_as_the_trainers_wandb_callback_keys_them():
    """tracking.trainer_keys stands in for transformers' rewrite_logs (whose import costs a cached
    re-run ~5 s): both give the same keys."""
    from transformers.integrations.integration_utils import rewrite_logs

    from tasks.tracking import trainer_keys

    row = {"loss": 2.1, "grad_norm": 0.5, "learning_rate": 1e-4, "epoch": 0.3, "eval_loss": 1.9, "eval_runtime": 2.0,
           "test_accuracy": 0.4, "train_runtime": 12.0, "evaluation": 1, "tested": 2}
    assert trainer_keys(row) == rewrite_logs(row)
