"""The whole pipeline as one Prefect flow on a tiny model: every artifact, then the cache."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from flows.finetune import finetune
from tasks.cache_limit import cache_root
from tasks.pointers import read_pointer
from tasks.runtime import FIXTURES
from tasks.storage import ArtifactStore
from tests.conftest import tiny_run_config

EXPECTED = [
    "config.json",
    "template/rendered_example.txt",
    "model/model.safetensors",
    "model/tokenizer.json",
    "samples/samples.jsonl",
    "samples/side_by_side.md",
    "training/metrics.json",
    "training/log_history.json",
    "benchmarks/gsm8k/base.jsonl",
    "benchmarks/gsm8k/tuned.jsonl",
    "benchmarks/gsm8k/base.summary.json",
    "benchmarks/gsm8k/tuned.summary.json",
    "benchmarks/comparison.json",
    "data/template_preview.md",
    "data/token_lengths.json",
    "data/token_lengths.png",
    "judge/pairs.jsonl",
    "judge/summary.json",
    "report/report.md",
    "report/report.html",
    "report/trend.png",
    "report/sections/benchmarks.md",
    "gate/decision.json",
    "manifest.json",
]


def _unpickled(path: Path):
    """The object in one of Prefect's result files: a task's record (JSON: metadata + the pickled
    result, base64), or the flow's own return value (the pickle alone, base64)."""
    import base64

    import cloudpickle

    text = path.read_text()
    return cloudpickle.loads(base64.b64decode(json.loads(text)["result"] if text.startswith("{") else text))


def _task_states(flow_run_id, wait_s: float = 60) -> dict[str, set[str]]:
    """{task name: the states its runs ended in} for one finished flow run, read from the Prefect server.

    The server records task runs from the events the run sent, a moment after the flow returns: a
    task run can be listed before its final state is, so read until every one has a final state."""
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    states: dict[str, set[str]] = {}
    for r in runs:
        states.setdefault(r.name.split("-", 1)[0], set()).add(r.state.name)  # "benchmark-gsm8k-base": benchmark
    return states


def _progress(flow_run_id) -> dict[str, float]:
    """{key: progress} of the flow run's progress artifacts (training steps, benchmarks)."""
    with get_client(sync_client=True) as client:
        by_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        found = client.read_artifacts(artifact_filter=by_run)
    return {a.key: a.data for a in found if a.type == "progress"}


def check_run_folder(run_uri: str) -> dict:
    """Every artifact is there, and the manifest (written last) hashes each one correctly."""
    store = ArtifactStore(run_uri)
    files = store.list_files()
    for rel in EXPECTED:
        assert rel in files, f"{rel} missing from {run_uri}"
    manifest = store.read_json("manifest.json")
    listed = {o["path"]: o for o in manifest["objects"]}
    assert set(listed) == set(files) - {"manifest.json", "status.json"}  # status.json changes after it:
    assert store.read_json("status.json")["state"] == "complete"  # it said "running" for good
    for rel in ("model/model.safetensors", "benchmarks/comparison.json"):
        assert listed[rel]["sha256"] == store.sha256(rel) and listed[rel]["size"] == store.size(rel)
    for pkg in ("python", "torch", "transformers", "trl", "prefect"):
        assert manifest["versions"][pkg]
    assert manifest["dataset"]["fingerprint"] and manifest["tuned_model"]["fingerprint"]
    # the device/precision decision and why (tasks/device.py), e.g. the CPU probe's timings
    assert manifest["execution"]["device"] in ("cpu", "cuda") and manifest["execution"]["reason"]
    return manifest


def wandb_summary(run_dir: Path) -> dict:
    """What W&B recorded, read back from the offline run files with W&B's own reader."""
    wandb_bin = Path(sys.executable).parent / "wandb"
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    out = subprocess.run(
        [str(wandb_bin), "leet", "inspect", "--summary", "--json", str(offline_run)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.slow
def test_flow_end_to_end_then_second_run_reuses_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    secret = "s3cr3t-never-logged-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # A training seed of its own: flows run earlier by this worker's other tests (also in their
    # subprocesses, which share SMOLFLOW_CACHE and so its results) must not make this first run a cache hit.
    config = tiny_run_config(tiny_model_dir, str(tmp_path / "artifacts"), training={"seed": 7013},
                             custom_benchmarks=[str(FIXTURES / "custom" / "capitals.yaml")])

    results, prefect_storage = cache_root() / "results", Path(os.environ["PREFECT_HOME"]) / "storage"
    results_before, prefect_before = set(results.glob("*")), set(prefect_storage.glob("*"))
    state = finetune(config=config, return_state=True)
    summary = state.result()
    run_uri = summary["run"]
    manifest = check_run_folder(run_uri)
    # The tasks' results are kept in smolflow's cache, under its bound, not in Prefect's storage
    # folder, which nothing cleans (tasks/caching.py).
    new_results = set(results.glob("*")) - results_before
    assert new_results and set(prefect_storage.glob("*")) == prefect_before

    store = ArtifactStore(run_uri)
    samples = [json.loads(line) for line in (Path(run_uri) / "samples/samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == config.sampling.prompts
    assert {"before", "after", "after_stopped_at_eos"} <= set(samples[0])
    assert [b["benchmark"] for b in summary["benchmarks"]] == ["gsm8k", "custom/capitals"]
    assert summary["benchmarks"][0]["n"] == 2 and summary["benchmarks"][1]["n"] == 8
    assert store.exists("benchmarks/custom/capitals/tuned.jsonl")
    # The judge compared the tuned model's answers to the sample prompts with the base model's, both orders.
    judge = store.read_json("judge/summary.json")
    assert judge["pairs"] == len(config.sampling.prompts) and summary["judge"]["n"] == judge["n"]
    pairs = [json.loads(line) for line in (Path(run_uri) / "judge/pairs.jsonl").read_text().splitlines()]
    assert [p["instruction"] for p in pairs] == config.sampling.prompts
    assert [p["output"] for p in pairs] == [s["after"] for s in samples]  # the run's own samples, not regenerated
    assert [p["reference_output"] for p in pairs] == [s["before"] for s in samples]
    assert judge["n"] == sum(p["preference"] is not None for p in pairs)  # parse failures are left out
    assert summary["training"]["steps"] == 3 and summary["training"]["eval_loss"] > 0
    report = store.fs.cat(store._path("report/report.md")).decode()
    assert "## Benchmarks (base vs tuned)" in report and "| gsm8k |" in report and "| custom/capitals |" in report
    # What each setting resolved to, from what it was set to: `null` here, not `auto`.
    assert "- `judge.max_new_tokens`: `null` → 8 (sampling.max_new_tokens)\n" in report, report
    # First, the night in a few lines (the configuration's YAML came first): verdict, training, scores, judge.
    head = report.split("## Summary\n\n", 1)[1].split("\n## ", 1)[0].splitlines()
    gsm8k = summary["benchmarks"][0]
    gate = store.read_json("gate/decision.json")
    assert head[0].startswith("- **Promoted**" if gate["promote"] else "- **Not promoted**"), head
    assert head[0].endswith("compared with the base model (first run: nothing promoted yet)."), head
    # Why not, under the verdict; and which benchmarks' few items could hide a drop (2 GSM8K items can)
    assert [line.split(":")[0] for line in gate["weak"]] == ["custom/capitals", "gsm8k"], gate["weak"]
    said = [f"  - {reason}" for reason in gate["reasons"]] + ["  - weak evidence (a drop could pass unseen): "
                                                            "custom/capitals, gsm8k; the gate section says how to sharpen it"]
    reasons, head = head[1:1 + len(said)], head[1 + len(said):]
    assert reasons == said, reasons
    assert head[0].startswith(f"- training: 3 steps, eval loss {summary['training']['eval_loss']:.4f} · "), head
    assert head[1].startswith(f"- gsm8k, base → tuned: {gsm8k['base']:.4f} → {gsm8k['tuned']:.4f} ("), head
    assert head[2].startswith("- custom/capitals, base → tuned: ") and head[3].startswith("- judge: "), head
    assert head[3].endswith(" pairs)"), head  # a tiny test model judged: no weak-judge note (test_judge.py has one)
    assert "## Judge (tuned vs reference)" in report and f"n={judge['n']} of {judge['pairs']} pairs" in report
    tokens = store.read_json("data/token_lengths.json")
    assert tokens["splits"]["train"]["rows"] == manifest["dataset"]["rows"]["train"]
    assert "| split | rows | min | median |" in report
    assert "<|im_start|>" in store.fs.cat(store._path("data/template_preview.md")).decode()
    # Configuration, data and the gate's decision, with links to the pieces.
    assert "## Configuration" in report and "max_steps: 3" in report
    assert f"fingerprint `{manifest['dataset']['fingerprint']}`" in report
    assert f"train: {manifest['dataset']['rows']['train']} rows" in report
    assert "## Regression gate" in report and "compared with the base model" in report
    # Links are relative to report/, so the folder reads the same after a move or a sync.
    assert "- [tuned model](../model/)" in report and f"- W&B run: `{run_uri}/wandb/offline-run-" in report
    assert "- code: `smolflow " in report
    # Each stage wrote its own section; report.md is only their stitching, in the layout's order.
    from tasks.layout import SECTIONS, RunPaths
    written = [name for name, _, _ in SECTIONS if store.exists(RunPaths.section(name))]
    assert written == [name for name, _, _ in SECTIONS]
    assert [line for line in report.splitlines() if line.startswith("## ")] == [f"## {h}" for _, h, _ in SECTIONS]
    html = store.fs.cat(store._path("report/report.html")).decode()
    assert "data:image/png;base64," in html and "<table>" in html and "<img src=\"../" not in html
    # The page opens offline in a real browser: every image decodes, nothing is fetched from elsewhere.
    from scripts.report_screenshot import render

    shown = render(Path(run_uri) / "report/report.html", tmp_path / "report.png")
    assert len(shown["images"]) >= 3 and all(w > 0 for w in shown["images"]), shown
    assert shown["requests"] == [] and (tmp_path / "report.png").stat().st_size > 10_000
    assert f"| {run_uri.rsplit('/', 1)[-1]} | " in report  # the score trend's one row so far
    # W&B offline run files are in the run folder, ready for `wandb sync`.
    assert any(f.startswith("wandb/") and f.endswith(".wandb") for f in store.list_files())
    recorded = wandb_summary(Path(run_uri))
    history = json.loads((Path(run_uri) / "training/log_history.json").read_text())
    last_loss = [h["loss"] for h in history if "loss" in h][-1]
    assert recorded["summary"]["train/loss"] == last_loss
    saved = json.loads((Path(run_uri) / "training/metrics.json").read_text())
    assert recorded["summary"]["eval_loss"] == saved["eval_loss"]
    assert saved["eval_loss"] == pytest.approx(summary["training"]["eval_loss"], abs=5e-5)
    # What `smolflow run` prints: 4 decimals and counts, not 1.8705527861913045 and `steps: 30.0`
    assert summary["training"]["eval_loss"] == round(saved["eval_loss"], 4)
    assert type(summary["training"]["steps"]) is int
    assert {"samples", "benchmarks", "judge_pairs"} <= set(recorded["summary"])  # the tables
    # The report's summary in the run's notes (W&B's runs table and overview), after the Prefect link
    notes = recorded["notes"]
    assert notes.startswith("Prefect flow run: http") and "\n\nSummary (the report's):\n- " in notes, notes
    assert f"- gsm8k, base → tuned: {summary['benchmarks'][0]['base']:.4f} → " in notes and "**" not in notes, notes
    assert recorded["summary"]["judge/wins"] == judge["wins"]
    bench = summary["benchmarks"][0]
    assert recorded["summary"]["bench/gsm8k/tuned"] == pytest.approx(bench["tuned"], abs=1e-4)
    assert recorded["summary"]["bench/gsm8k/delta"] == pytest.approx(bench["delta"], abs=1e-4)
    assert recorded["summary"]["promoted"] == summary["promoted"]  # set once promote() returned
    assert recorded["summary"]["gate/passed"] is summary["promoted"]  # first run: no re-check rejects it
    assert recorded["summary"]["gate/reasons"] == summary["gate"]
    assert recorded["config"]["training"]["max_steps"] == 3
    # No secret from the environment ends up in any artifact (W&B files included).
    for path in Path(run_uri).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    states = _task_states(state.state_details.flow_run_id)
    assert states["train_sft"] == {"Completed"}
    with get_client(sync_client=True) as client:  # the UI tells the samples apart by model
        names = {r.name for r in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))}
    assert {"samples-base", "samples-tuned"} <= names, names
    progress = _progress(state.state_details.flow_run_id)  # both bars ran to the end
    assert progress == {"smolflow-training-progress": 100.0, "smolflow-benchmark-progress": 100.0}
    # The gate compared with the base model (first run) and moved `promoted` only if it passed.
    decision = store.read_json("gate/decision.json")
    assert decision["against"].startswith("base model")
    promoted = read_pointer(str(tmp_path / "artifacts"), "smolflow-finetune", "promoted")
    assert summary["promoted"] == decision["promote"] == (promoted is not None)
    assert read_pointer(str(tmp_path / "artifacts"), "smolflow-finetune", "latest")["run_id"] == run_uri.rsplit("/", 1)[-1]
    # The manifest was written again once the W&B run closed (after promotion): the pointers follow it.
    for pointer in (promoted, read_pointer(str(tmp_path / "artifacts"), "smolflow-finetune", "latest")):
        assert pointer is None or pointer["manifest_sha256"] == store.sha256("manifest.json")

    # Evicting a result (the cache bound) costs its task's time, never the run: drop the custom
    # benchmark's two results, and those two tasks score again while the rest stays cached.
    evicted = [p for p in new_results if "capitals" in getattr(_unpickled(p), "name", "")]
    assert len(evicted) == 2, [type(_unpickled(p)).__name__ for p in new_results]
    for path in evicted:
        path.unlink()
    # Named as the Prefect UI's Run form lets anyone name it: the run id is made from the name, and
    # 'sweep lr/2e-4' made runs/<time>-sweep lr/2e-4/ (nested, found by no reader), then W&B refused
    # the run (UsageError: Run ID cannot contain the characters /:;,#?').
    again = finetune.with_options(flow_run_name="sweep lr/2e-4: #3")(config=config, return_state=True)
    states = _task_states(again.state_details.flow_run_id)
    # Everything that computes is reused, also where the tuned model now lies in a new folder.
    for name in ("prepare_chat_template", "tokenize_dataset", "train_sft", "samples", "benchmark"):
        assert states[name] == {"Cached"}, states
    assert states["custom"] == {"Completed"}, states
    # A verdict the gate reads always comes from the code that runs (a cached one kept an older code's)
    assert states["assess_training"] == {"Completed"}, states
    second = again.result()
    assert second["run"] != run_uri and second["run"].endswith("-sweep-lr-2e-4-3")
    assert sorted(p.name for p in (tmp_path / "artifacts" / "runs").iterdir()) == sorted(
        Path(u).name for u in (run_uri, second["run"]))
    # Its W&B run has the loss curve of the run that trained the model, and says whose it is.
    reused = wandb_summary(Path(second["run"]))["summary"]
    assert reused["train/loss"] == last_loss and reused["training/reused_from"] == run_uri + "/model"
    assert second["model"] == second["run"] + "/model"  # the reused model, copied into this run
    check_run_folder(second["run"])
    trend = ArtifactStore(second["run"]).fs.cat(str(Path(second["run"], "report/report.md"))).decode()
    assert f"| {run_uri.rsplit('/', 1)[-1]} | " in trend and f"| {second['run'].rsplit('/', 1)[-1]} | " in trend
    assert manifest["tuned_model"]["fingerprint"] == ArtifactStore(second["run"]).read_json("manifest.json")["tuned_model"]["fingerprint"]


@pytest.mark.slow
def test_a_retried_flow_run_carries_on_in_its_first_attempts_run_folder(tiny_model_dir, tmp_path, monkeypatch):
    """The flow run page's Retry runs the same flow run again (as a flow's retries do): the run id
    came from the time of each attempt, so the retry trained again from step 0 in a new run folder,
    beside the first attempt's, which stayed failed (or stopped) with its checkpoints."""
    import flows.finetune as module

    real, calls = module.save_samples, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the first attempt fails after training")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "save_samples", fails_once)
    config = tiny_run_config(tiny_model_dir, str(tmp_path / "artifacts"), benchmarks=[], judge={"enabled": False})
    result = finetune.with_options(retries=1, retry_delay_seconds=0)(config)
    assert len(calls) == 2
    assert result["judge"] == "not run: judge.enabled: false"  # the printed summary says why there is no verdict
    run_id = Path(result["manifest"]).parent.name
    assert [p.name for p in (tmp_path / "artifacts" / "runs").iterdir()] == [run_id]


def test_the_config_section_says_what_each_resolved_setting_was_set_to():
    """`auto` or `null` as the user left it, then what it meant on the machine (torch_threads: null
    read "`auto` → 2 (every core)", naming a value no one set)."""
    from tasks.config import RunConfig
    from tasks.reporting import config_markdown

    config = RunConfig().model_dump(mode="json")
    resolved = {"torch_threads": "2 (every core)", "benchmarks[0].data": "fixture (...)", "model": "builtin:x",
                "no.such.key": "y"}
    lines = config_markdown(config, resolved).split("\n\n")[1].splitlines()
    assert lines == ["- `torch_threads`: `null` → 2 (every core)", "- `benchmarks[0].data`: `auto` → fixture (...)",
                     "- `model`: `auto` → builtin:x", "- `no.such.key`: `auto` → y"], lines


def test_cli_help_lists_the_fields():
    out = subprocess.run([str(Path(sys.executable).parent / "smolflow"), "run", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    assert "--training.max-steps" in out.stdout and "--output.artifacts-uri" in out.stdout
