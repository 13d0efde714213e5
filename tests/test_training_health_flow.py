"""The flow publishes its training-health verdict and loss curves: in the run folder, in the
report, as Prefect artifacts and in the W&B run summary."""

import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.finetune import finetune
from tasks.storage import ArtifactStore
from tests.conftest import tiny_run_config
from tests.test_flow import wandb_summary


@pytest.mark.slow
def test_flow_reports_training_health_and_curves(tiny_model_dir, tmp_path):
    config = tiny_run_config(tiny_model_dir, str(tmp_path / "artifacts"), output={"run_id": "health-1"},
                             training={"max_steps": 4, "eval_steps": 1})
    state = finetune(config=config, return_state=True)
    run = Path(state.result()["run"])

    png = (run / "training/curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    health = json.loads((run / "training/health.json").read_text())
    signs = {s["name"]: s for s in health["signs"]}
    assert set(signs) == {"overfitting", "underfitting", "memorisation", "format"}
    # The format verdict agrees with the after-training samples the run wrote.
    samples = [json.loads(line) for line in (run / "samples/samples.jsonl").read_text().splitlines()]
    fmt = signs["format"]["numbers"]
    assert fmt["no_eos"] == sum(not s["after_stopped_at_eos"] for s in samples)
    assert signs["format"]["fired"] == (fmt["no_eos"] + fmt["template_breaks"] > 0)
    assert health["healthy"] == (not any(s["fired"] for s in signs.values()))
    report = ArtifactStore(str(run)).fs.cat(str(run / "report/report.md")).decode()
    assert "## Training health" in report and "training/curves.png" in report

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert "format" in by_key["smolflow-training-health"].data
    curves = by_key["smolflow-training-curves"].data
    assert "data:image/png;base64," in curves and "| 4 |" in curves  # image inline, numbers per step

    recorded = wandb_summary(run)["summary"]
    assert recorded["health/healthy"] == health["healthy"]
    assert recorded["health/format/fired"] == signs["format"]["fired"]
