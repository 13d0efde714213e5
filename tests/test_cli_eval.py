"""`smolflow eval` from the command line: scores, listing and comparing runs, the settings it refuses,
the default model into W&B. Apart from test_cli.py so that pytest-xdist (files whole, one per
worker) runs the two files' slow subprocess runs side by side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.leftovers import _running
from tests.test_cli import cli_env, smolflow
from tests.test_leftovers import kill, orphaned_temporary_server


@pytest.fixture(scope="module")
def env():
    return cli_env()


def _eval_args(root: Path, model: str, limit: int) -> list[str]:
    bench = json.dumps([{"name": "gsm8k", "limit": limit, "batch_size": 2}])
    return ["eval", "--model", model, "--benchmarks", bench, "--output.artifacts-uri", str(root),
            "--judge.enabled", "false", "--wandb.mode", "disabled", "--torch-threads", "1"]


def _evaluate_run_ids() -> set[str]:
    """The run ids of the smolflow-evaluate flow runs the session's Prefect server holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["smolflow-evaluate"])))
    return {r.parameters.get("config", {}).get("output", {}).get("run_id") for r in runs}


@pytest.mark.slow
def test_eval_runs_lists_and_compares(env, tiny_model_dir, tmp_path):
    root = tmp_path / "artifacts"
    first = smolflow(env, *_eval_args(root, str(tiny_model_dir), 2), "--output.run-id", "eval-a")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = __import__("yaml").safe_load(first.stdout)
    assert (root / "runs/eval-a/report/report.html").is_file() and (root / "runs/eval-a/manifest.json").is_file()
    saved = json.loads((root / "runs/eval-a/benchmarks/gsm8k/model.summary.json").read_text())
    # What it prints is what it saved: the model's score (an eval run once printed `benchmarks: []`).
    [row] = summary["benchmarks"]
    assert "training" not in summary, summary  # nothing trained: no `training: null`
    assert row["benchmark"] == "gsm8k" and row["model"] == "model" and row["n"] == 2 == saved["n"]
    assert row["score"] == round(saved["score"], 4) and row["comparability_key"] == saved["comparability_key"]
    report = (root / "runs/eval-a/report/report.md").read_text()
    assert f"| gsm8k | model | {saved['metric']} | 2 | {saved['score']:.4f} |" in report
    assert f"## Summary\n\n- gsm8k: {saved['score']:.4f} (n=2, " in report  # one model: its score, no base → tuned
    # The evaluated model of a run id is that run's model: same fingerprint, so the cached score is reused.
    # No API URL set, but `smolflow serve`'s server (here the session's) answers: the run reports to it.
    unset = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"SMOLFLOW_LOCAL_SERVER": env["PREFECT_API_URL"]}
    second = smolflow(unset, *_eval_args(root, "eval-a", 2), "--output.run-id", "eval-b")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reporting to the Prefect server running at" in second.stderr
    assert "Starting temporary server" not in second.stdout + second.stderr
    assert "eval-b" in _evaluate_run_ids()
    a = json.loads((root / "runs/eval-a/benchmarks/gsm8k/model.summary.json").read_text())
    b = json.loads((root / "runs/eval-b/benchmarks/gsm8k/model.summary.json").read_text())
    assert a == b
    # The eval flow applies the execution settings (it once ignored them): bf16 forced on any CPU.
    bf16 = smolflow(env, *_eval_args(root, str(tiny_model_dir), 2), "--output.run-id", "eval-bf16",
                    "--execution.precision", "bf16")
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    in_bf16 = json.loads((root / "runs/eval-bf16/benchmarks/gsm8k/model.summary.json").read_text())
    assert in_bf16["settings"]["dtype"] == in_bf16["comparability"]["precision"] == "bfloat16"
    # eval-a ran in what `auto` picked on this machine (bf16 only where the probe finds it faster),
    # and its score is comparable with the bf16 one exactly when that was bf16 too.
    auto = json.loads((root / "runs/eval-a/manifest.json").read_text())["execution"]["precision"]
    assert a["settings"]["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[auto]
    assert (in_bf16["comparability_key"] == a["comparability_key"]) == (auto == "bf16")
    assert json.loads((root / "runs/eval-bf16/manifest.json").read_text())["execution"]["precision"] == "bf16"
    missing = smolflow(env, *_eval_args(root, str(tmp_path / "no-model"), 2), "--output.run-id", "eval-missing")
    assert missing.returncode == 2 and "not a model directory" in missing.stderr  # found out before the flow
    assert not (root / "runs/eval-missing").exists()
    broken = tmp_path / "broken-model"  # passes that check (config.json, weights, tokenizer), fails loading in the flow
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    weightless = smolflow(env, *_eval_args(root, str(broken), 2), "--output.run-id", "eval-weightless")
    assert weightless.returncode == 2 and "no weights in it" in weightless.stderr
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a real tokenizer: the empty config.json is what breaks
        (broken / name).write_bytes((tiny_model_dir / name).read_bytes())
    failed = smolflow(env, *_eval_args(root, str(broken), 2), "--output.run-id", "eval-bad")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr.split("smolflow eval: error")[-1]
    assert json.loads((root / "runs/eval-bad/status.json").read_text())["state"] == "failed"

    listed = smolflow(env, "runs", "--root", str(root), "--json")
    assert listed.returncode == 0
    rows = {r["run_id"]: r for r in json.loads(listed.stdout)}
    assert rows["eval-a"]["status"] == "complete" and rows["eval-a"]["scores"]["gsm8k"] == round(a["score"], 4)
    assert rows["eval-bad"]["status"] == "failed" and rows["eval-bad"]["why"].startswith("ValueError: ")
    table, why = smolflow(env, "runs", "--root", str(root)).stdout, " ".join(rows["eval-bad"]["why"].split())
    assert "failed (ValueError" in table
    assert (why in table) == (len(why) <= 72)  # a long reason is cut to one table cell; --json has it whole

    compared = smolflow(env, "compare", "eval-a", "eval-b", "--root", str(root))
    assert compared.returncode == 0 and "| " not in compared.stdout
    assert "model" in compared.stdout and "* " in compared.stdout  # the model setting differs, and is marked
    assert "\nPromoted: A no gate (an eval run, or stopped before it) · B no gate (an eval run" in compared.stdout
    as_json = json.loads(smolflow(env, "compare", "eval-a", "eval-b", "--root", str(root), "--json").stdout)
    assert as_json["scores"][0]["delta"] == 0 and {s["setting"] for s in as_json["settings"] if s["differs"]} == {
        "model", "output.run_id"}
    assert smolflow(env, "compare", "eval-a", "nope", "--root", str(root)).returncode == 2

    dry = smolflow(env, "gc", "--root", str(root), "--dry-run", "--keep-runs", "1")
    assert dry.returncode == 0 and "dry run: nothing deleted" in dry.stdout and "| eval-a | delete | run |" in dry.stdout
    assert (root / "runs/eval-a/manifest.json").is_file()  # listed, not deleted
    # Retention applies after an eval run as after a fine-tune (it once never ran there), and so does
    # the reaping of a temporary Prefect server that a SIGKILLed earlier run left (it once did not).
    home = tmp_path / "prefect-home"
    orphan = orphaned_temporary_server(home)
    try:
        kept = smolflow(env | {"PREFECT_HOME": str(home)}, *_eval_args(root, str(tiny_model_dir), 2),
                        "--output.run-id", "eval-c", "--output.keep-runs", "1")
        assert kept.returncode == 0, kept.stderr[-3000:]
        assert not _running(orphan) and f"Stopped 1 temporary Prefect server(s) left by a killed run: pids [{orphan}]" in kept.stderr
    finally:
        kill(orphan)
    assert (root / "runs/eval-c/manifest.json").is_file()
    assert not any((root / "runs" / old).exists() for old in ("eval-a", "eval-b", "eval-bf16"))


def test_eval_refuses_the_settings_of_stages_it_does_not_run(env, tmp_path):
    for flag, value, says in (("--training.max-steps", "5", "training.max_steps: smolflow eval scores a model and "
                               "trains nothing, so it has no training (smolflow run does); remove it"),
                              ("--wandb.log-model", "true", "wandb.log_model: smolflow eval scores a model"),
                              ("--data.dataset", "x.jsonl", "data.dataset: smolflow eval scores a model"),
                              ("--sampling.max-new-tokens", "5", "sampling.max_new_tokens: smolflow eval"),
                              # the default model is the judge's own reference: the judge is skipped, its
                              # settings were silently ignored
                              ("--judge.limit", "2", "judge.limit: the judge is skipped: "
                               "model='builtin:smollm2-135m-instruct' is the default model")):
        out = smolflow(env, "eval", "--model", "builtin:smollm2-135m-instruct", flag, value,
                       "--output.artifacts-uri", str(tmp_path))
        assert out.returncode == 2 and f"smolflow eval: error: flag {flag}: {says}" in out.stderr, out.stderr[-2000:]
    # A hub model that is not cached, offline: said before the flow (it once failed in it, exit 1).
    out = smolflow(env | {"HF_HUB_OFFLINE": "1"}, "eval", "--model", "HuggingFaceTB/SmolLM2-360M",
                   "--output.artifacts-uri", str(tmp_path))
    assert out.returncode == 2 and "not in the local Hugging Face cache" in out.stderr, out.stderr[-2000:]
    # A bare name, meant as a run's id perhaps: both readings are said
    out = smolflow(env | {"HF_HUB_OFFLINE": "1"}, "eval", "--model", "nightly-fox", "--output.artifacts-uri", str(tmp_path))
    assert out.returncode == 2 and "model='nightly-fox': not in the local Hugging Face cache" in out.stderr, out.stderr
    assert f"; nor is it a run under {tmp_path} (`smolflow runs` lists them;" in out.stderr, out.stderr[-2000:]
    assert not tmp_path.joinpath("runs").exists()  # refused before any run folder


@pytest.mark.slow
def test_eval_of_the_builtin_model_scores_the_default_benchmark_into_wandb(env, tmp_path):
    from tests.test_flow import wandb_summary

    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}  # no server: a temporary one, as `smolflow eval` alone
    out = smolflow(env, "eval", "--model", "builtin:smollm2-135m-instruct", "--benchmarks",
                   '[{"name": "gsm8k", "limit": 1}]', "--output.artifacts-uri", str(tmp_path),
                   "--wandb.mode", "offline", "--torch-threads", "1", "--output.run-id", "builtin")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/builtin/benchmarks/gsm8k/model.summary.json").read_text())
    assert summary["n"] == 1 and summary["metric"] == "exact_match,strict-match" and 0 <= summary["score"] <= 1
    # An eval run is a W&B run too (it once logged nothing): scores, the table, the report's files.
    recorded = wandb_summary(tmp_path / "runs/builtin")
    assert recorded["summary"]["bench/gsm8k/tuned"] == round(summary["score"], 4)  # named as a fine-tune's
    # no Prefect link here (no UI): the notes are the report's summary alone
    assert recorded["notes"].startswith(f"Summary (the report's):\n- gsm8k: {summary['score']:.4f} (n=1, "), recorded
    assert "benchmarks" in recorded["summary"] and recorded["config"]["model"] == "builtin:smollm2-135m-instruct"
    files = {p.name for p in (tmp_path / "runs/builtin/wandb").rglob("*") if p.is_file()}
    assert "report.md" in files  # the run folder's files, copied into the W&B run
    report = (tmp_path / "runs/builtin/report/report.md").read_text()
    assert "W&B run" in report
    # The report links only what the run wrote: an eval has no model, curves, gate or judge pairs.
    links = re.findall(r"\]\(\.\./([^)]*)\)", report)
    assert "benchmarks/" in links and all((tmp_path / "runs/builtin" / link).exists() for link in links), links
    # A temporary server has no UI: no "None/flow-runs/..." link (Prefect's ui_url without a UI URL).
    assert "None/" not in report and "Prefect flow run" not in report
    assert recorded["config"]["prefect"]["flow_run_link"] is None and recorded["config"]["prefect"]["flow_run_id"]
    # What each `auto` meant, as a fine-tune records it (eval wrote no resolved.json).
    resolved = json.loads((tmp_path / "runs/builtin/resolved.json").read_text())
    assert resolved["execution.precision"].split()[0] in ("fp32", "bf16") and "data.dataset" not in resolved
    manifest = json.loads((tmp_path / "runs/builtin/manifest.json").read_text())
    assert manifest["resolved"] == resolved and "Resolved on this machine" in report
    # The config as eval ran it: no training, data, gate or template defaults as if it had trained.
    ran = json.loads((tmp_path / "runs/builtin/config.json").read_text())
    assert not {"training", "data", "gate", "template"} & set(ran) and "max_steps" not in report
    # Which code ran, in the manifest and in W&B (whose own git capture sees nothing from the cache).
    assert manifest["versions"]["smolflow"] == recorded["config"]["versions"]["smolflow"]
    assert manifest["versions"]["smolflow"].startswith("smolflow ")
    assert recorded["summary"]["bench/gsm8k/tuned_n"] == 1  # 0.3333 of 3 is not 0.3333 of 300
    # the judge's reference is this model itself: skipped, and the report says so (it said "judge.enabled: false")
    assert (tmp_path / "runs/builtin/report/sections/judge.md").read_text().startswith(
        "Not run (the evaluated model is the default model, the judge's reference (judge.reference: base); set ")
    assert "\njudge: 'not run: the evaluated model is the default model" in out.stdout, out.stdout  # not `judge: null`
