"""What a W&B run says matches what the run folder says: the gate's verdict before promotion and
promoted only after it, what the gate compared against, benchmark scores with their stderr and
metric under one naming in both flows, smolflow's whole-run train loss, the resolved `auto`s, the
Prefect flow run, health signs that read as fired; and a failed or stopped run's W&B run says so,
with a non-zero exit code, in the run folder's wandb/.

Every W&B run here is a real offline one, read back with W&B's own reader (`wandb leet inspect`).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.benchmarks.base import BenchmarkResult
from tasks.config import RunConfig, WandbConfig
from tasks.config_eval import NOT_IN_EVAL
from tasks.gate import Score, decide
from tasks.generation import Sample
from tasks.health import HealthReport, Sign
from tasks.judge import JudgeResult
from tasks.models import ModelRef
from tasks.pointers import read_pointer
from tasks.storage import ArtifactStore, verify_run, write_manifest
from tasks.tracking import close_on_stop, finish_wandb, log_eval_wandb, log_wandb, start_flow_wandb, start_wandb
from tasks.training import TrainResult

ROOT = Path(__file__).resolve().parents[1]


def _inspect(run_dir: Path, *view: str) -> str:
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # the run folder's one W&B run
    return subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", *view, "--json",
                           str(offline)], capture_output=True, text=True, timeout=120, check=True).stdout


def records(run_dir: Path) -> list[dict]:
    """Every record of the offline run, read with W&B's own reader."""
    return [json.loads(line) for line in _inspect(run_dir).splitlines() if line.strip()]


def recorded(run_dir: Path) -> dict:
    """The run as W&B sums it up: config, summary, tags, notes, state, exit_code."""
    return json.loads(_inspect(run_dir, "--summary"))


def _result(name: str, score: float, stderr: float, key: str = "k1") -> BenchmarkResult:
    return BenchmarkResult(name=name, score=score, stderr=stderr, n=10, metric="exact_match,strict-match",
                           settings={}, metrics={}, records=[], seconds=1.0, comparability_key=key,
                           provenance={"note": "fixture items"})


def _judge() -> JudgeResult:
    record = {"instruction": "Hi", "output": "Hello", "reference_output": "Hey", "verdict_tuned_as_a": "A",
              "verdict_tuned_as_b": "B", "preference": 1.0}
    return JudgeResult(win_rate=100.0, stderr=None, n=1, pairs=1, wins=1, ties=0, losses=0, parse_failures=0,
                       records=[record], settings={}, seconds=1.0)


def test_finetune_wandb_run_says_what_the_run_folder_says(tiny_model_dir, tmp_path):
    run = ArtifactStore(str(tmp_path / "artifacts")).child("runs", "r1")
    run.write_json("config.json", {})
    work = tmp_path / "work"
    wb = start_wandb(WandbConfig(mode="offline"), "r1", {"model": "auto"}, work, "smolflow-finetune")
    model = ModelRef(source="tiny", path=str(tiny_model_dir), fingerprint="f")
    # A resumed run: the Trainer's own train_loss is the mean since the resume (say 0.5); smolflow's,
    # over every step, is 1.5. Its training was reused (a cached night): the Trainer logged no config.
    trained = TrainResult(model=model, metrics={"train_loss": 1.5, "eval_loss": 1.25},
                          log_history=[{"step": 1, "loss": 2.0},
                                       {"step": 2, "loss": 1.0, "train_loss": 0.5, "train_runtime": 49.3, "total_flos": 7.0}],
                          trainer_args={"learning_rate": 0.0002, "max_steps": 2})
    scores = {"gsm8k": {"base": _result("gsm8k", 0.2, 0.05), "tuned": _result("gsm8k", 0.3, 0.06)}}
    decision = decide({"gsm8k": Score.of(scores["gsm8k"]["tuned"])}, {"gsm8k": Score.of(scores["gsm8k"]["base"])},
                      "base model (first run: nothing promoted yet)")
    assert decision.promote
    sign = Sign(name="format", fired=True, summary="no EOS", numbers={"no_eos": 2}, advice="train longer")
    health = HealthReport(healthy=False, signs=[sign])
    sample = Sample(prompt="Hi", completion="Hello", new_tokens=1, stopped_at_eos=True)

    earlier = log_wandb(wb, run, trained, [sample], [sample], scores, health, _judge(), decision,
                        reused_from="file:///elsewhere/model")
    write_manifest(run.uri, {"run_id": "r1", "completed_at": "now"})
    # The gate passed, then promote()'s compare-and-swap re-check rejected it (another run was
    # promoted in between): W&B must not say promoted.
    finish_wandb(wb, run, work, False, earlier, model)

    recs, seen = records(Path(run.uri)), recorded(Path(run.uri))
    summary = seen["summary"]
    assert summary["train_loss"] == 1.5  # smolflow's whole-run mean, as in metrics.json
    # The reused training's cost was the earlier run's: summed over runs, it counts once.
    assert summary["train_runtime"] == 0 and summary["training/reused/train_runtime"] == 49.3
    assert "total_flos" not in summary and summary["training/reused/total_flos"] == 7.0
    assert summary["gate/passed"] is True and summary["promoted"] is False
    assert "gate/promoted" not in summary
    assert "promoted" not in seen.get("tags", [])
    assert summary["gate/reference_run"] == "base model" and summary["gate/against"].startswith("base model")
    assert (summary["gate/gsm8k/reference"], summary["gate/gsm8k/delta"], summary["gate/gsm8k/ok"]) == (0.2, 0.1, True)
    assert summary["gate/gsm8k/allowed_drop"] == decision.table[0]["tolerance"]
    assert (summary["bench/gsm8k/base_stderr"], summary["bench/gsm8k/tuned_stderr"]) == (0.05, 0.06)
    assert summary["bench/gsm8k/metric"] == "exact_match,strict-match" and summary["bench/gsm8k/comparability_key"] == "k1"
    assert summary["health/format/fired"] is True and summary["health/warnings"] == ["format"]
    assert "health/format" not in summary
    assert {"judge_pairs", "benchmarks", "samples"} <= set(summary)
    assert seen["config"]["learning_rate"] == 0.0002  # a reused training's Trainer settings
    # One model collection for the flow: its `latest` alias moves from night to night.
    (artifact,) = [r["artifact"] for r in recs if r["type"] == "artifact" and r["artifact"]["type"] == "model"]
    assert artifact["name"] == "smolflow-finetune-model" and artifact["aliases"] == ["latest"]
    verify_run(run.uri)  # the manifest, written before promotion, hashes the W&B files uploaded after it


def test_eval_wandb_run_names_scores_as_a_finetune_and_logs_the_judge_pairs(tmp_path):
    run = ArtifactStore(str(tmp_path / "artifacts")).child("runs", "e1")
    run.write_json("config.json", {})
    wb = start_wandb(WandbConfig(mode="offline"), "e1", {}, tmp_path / "work", "smolflow-evaluate", job_type="eval")
    log_eval_wandb(wb, run, {"gsm8k": {"model": _result("gsm8k", 0.123456, 0.0456789)}}, _judge())
    write_manifest(run.uri, {"run_id": "e1", "kind": "eval", "completed_at": "now"})
    # Retention comes next, then the W&B run closes: a failure in between closes it failed, the
    # scores logged already (they once were logged only at the close, so a failed run had none).
    close_on_stop(wb, run, tmp_path / "work")({"state": "failed", "why": "OSError: retention failed"})

    seen = recorded(Path(run.uri))
    summary = seen["summary"]
    assert (summary["bench/gsm8k/tuned"], summary["bench/gsm8k/tuned_stderr"]) == (0.1235, 0.0457)
    assert summary["bench/gsm8k/metric"] == "exact_match,strict-match" and summary["bench/gsm8k/comparability_key"] == "k1"
    assert "bench/gsm8k/score" not in summary
    assert "judge_pairs" in summary and summary["judge/wins"] == 1
    assert seen["state"] == "failed" and summary["status/why"] == "OSError: retention failed"
    verify_run(run.uri)  # the manifest, re-hashed over the W&B files


def test_wandb_run_is_grouped_by_flow_with_the_prefect_run_and_resolved_autos_in_its_config(tmp_path):
    from prefect import flow
    from prefect.runtime import flow_run

    from tasks.checks import resolve_autos

    @flow(name="smolflow-evaluate")
    def started() -> tuple[str, str]:
        config = RunConfig()  # model, data and wandb.mode `auto`
        wb = start_flow_wandb(config, "g1", tmp_path / "work", resolve_autos(config), job_type="eval",
                              leave_out=NOT_IN_EVAL)
        wb.finish()
        return flow_run.id, flow_run.get_name()

    run_id, name = started()
    from tasks.storage import ArtifactStore as Store

    Store(str(tmp_path / "runs/g1")).upload_dir(tmp_path / "work" / "wandb", "wandb")
    run_record = next(r for r in records(tmp_path / "runs/g1") if r["type"] == "run")["run"]
    assert run_record["run_group"] == "smolflow-evaluate"  # not the flow run's random name
    config = recorded(tmp_path / "runs/g1")["config"]
    assert (config["prefect"]["flow_run_id"], config["prefect"]["flow_run_name"]) == (run_id, name)
    assert config["prefect"]["deployment"] is None
    if config["prefect"]["flow_run_link"]:
        assert config["prefect"]["flow_run_link"] in run_record.get("notes", "")
    assert config["model"] == "auto" and config["resolved"]["model"] != "auto"
    assert config["resolved"]["wandb.mode"].startswith("offline")
    assert "data.dataset" not in config["resolved"]  # eval has no data
    for section, fields in NOT_IN_EVAL.items():  # eval refuses them: not in its W&B config either
        if fields is None:
            assert section not in config
        else:
            assert not set(fields) & set(config.get(section, {}))


def test_a_served_night_resumed_from_the_command_line_stays_in_its_deployments_group(tmp_path, monkeypatch):
    """`smolflow run --output.run-id` of a served night that failed runs with no deployment: its W&B run
    moved to the flow's group and lost the `nightly` tag (the deployment was recorded nowhere else).
    status.json keeps the deployment; the resume takes it from there."""
    from prefect import flow

    from tasks.runs import served_as, status_recorded
    from tasks.storage import ArtifactStore as Store

    run = Store(str(tmp_path / "runs/n1"))

    @flow(name="smolflow-finetune")
    def attempt(fail: bool) -> str | None:
        served = served_as(run)
        wb = start_flow_wandb(RunConfig(wandb={"mode": "offline"}), "n1", tmp_path / "work", {}, served=served)
        try:
            with status_recorded(run, deployment=served):
                if fail:
                    raise RuntimeError("out of disk")
        except RuntimeError:
            pass
        finally:
            wb.finish()
        return served

    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "nightly")  # as Prefect's runner tells a served run
    assert attempt(True) == "nightly"
    status = json.loads((tmp_path / "runs/n1/status.json").read_text())
    assert (status["state"], status["deployment"]) == ("failed", "nightly")
    monkeypatch.delenv("PREFECT__RUNTIME__DEPLOYMENT__NAME")  # the command line: no deployment
    assert attempt(False) == "nightly"
    assert json.loads((tmp_path / "runs/n1/status.json").read_text())["deployment"] == "nightly"
    resumed = sorted((tmp_path / "work" / "wandb").glob("offline-run-*"))[-1]  # the second attempt's W&B files
    Store(str(tmp_path / "resumed")).upload_dir(resumed, f"wandb/{resumed.name}")
    run_record = next(r["run"] for r in records(tmp_path / "resumed") if r["type"] == "run")
    assert run_record["run_group"] == "nightly" and run_record["tags"] == ["nightly"]
    assert recorded(tmp_path / "resumed")["config"]["prefect"]["deployment"] == "nightly"

    @flow(name="smolflow-finetune")
    def fresh() -> str | None:
        return served_as(Store(str(tmp_path / "runs/n2")))

    assert fresh() is None  # a run never served: grouped by the flow's name, as before


def _start_run(tmp_path: Path, tiny_model_dir: Path, run_id: str, training: dict | None = None, before: str = "",
               **env) -> tuple[subprocess.Popen, Path]:
    """`smolflow run` in a child process (its own session); `before`: Python run before the CLI's main."""
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import tiny_run_config

    training = training or {"max_steps": 100000, "eval_steps": 200000, "save_steps": 200000}
    config = tiny_run_config(tiny_model_dir, str(tmp_path / "artifacts"), output={"run_id": run_id},
                             judge={"enabled": False}, training=training)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    # Its own W&B service: a W&B run earlier in this test process set WANDB_SERVICE, and a run that joins
    # that service loses its records when the test process's next W&B run tears the service down.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {
        "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)} | env
    main = f"{before}\nimport sys\nfrom flows.cli import main\nsys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", main, "run", "--config", str(tmp_path / "run.yaml")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, tmp_path / "artifacts" / "runs" / run_id


def _says_it_ended(run_dir: Path, state: str) -> None:
    """The run folder holds the W&B run, which says how and why it ended as status.json does."""
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == state
    seen = recorded(run_dir)
    assert (seen["summary"]["status/state"], seen["summary"]["status/why"]) == (status["state"], status["why"])
    assert seen["exit_code"] != 0 and seen["state"] == "failed"  # W&B shows it failed, not finished


@pytest.mark.slow
def test_a_failed_run_ends_its_wandb_run_failed_in_the_run_folder(tiny_model_dir, tmp_path):
    proc, run_dir = _start_run(tmp_path, tiny_model_dir, "timed-out", SMOLFLOW_RUN_TIMEOUT_HOURS="0.004")  # 14.4 s
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    _says_it_ended(run_dir, "failed")


@pytest.mark.slow
def test_a_failure_in_retention_at_the_very_end_ends_its_wandb_run_failed(tiny_model_dir, tmp_path):
    # Retention ran after the W&B run closed "finished": a failure there left W&B saying the run
    # succeeded while status.json said failed. The fault is injected into the child process only;
    # the flow, Prefect and W&B are real.
    boom = ("import tasks.retention as r\n"
            "def gc(*a, **k): raise OSError(28, 'No space left on device (injected by the test)')\n"
            "r.gc = gc")
    proc, run_dir = _start_run(tmp_path, tiny_model_dir, "retention-fails", training={"max_steps": 2}, before=boom)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    latest = read_pointer(str(tmp_path / "artifacts"), "smolflow-finetune", "latest")
    assert latest and latest["run_id"] == "retention-fails", out[-3000:]  # it got that far: manifest, pointers
    _says_it_ended(run_dir, "failed")
    assert "No space left on device" in json.loads((run_dir / "status.json").read_text())["why"]
    verify_run(str(run_dir))  # the manifest still hashes every file, the W&B folder's too


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_ends_its_wandb_run_stopped_without_hanging_or_orphans(tiny_model_dir, tmp_path):
    proc, run_dir = _start_run(tmp_path, tiny_model_dir, "sigterm")
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "data/token_lengths.json").exists():  # tokenized: training comes next
            assert time.monotonic() < deadline and proc.poll() is None, "the run never got going"
            time.sleep(1)
        time.sleep(5)  # into training
        os.kill(proc.pid, signal.SIGTERM)  # what a cancel in Prefect sends
        out, _ = proc.communicate(timeout=90)  # no hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-3000:]
    try:
        _says_it_ended(run_dir, "stopped")
    except (AssertionError, KeyError) as err:
        raise AssertionError(f"{err!r}; the run printed:\n{out[-4000:]}") from None
    time.sleep(3)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert f"--pid {proc.pid}" not in ps  # W&B's service, started for that process, is gone
    assert not [line for line in ps.splitlines() if str(run_dir) in line]
