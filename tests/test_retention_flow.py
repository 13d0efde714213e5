"""A completed run of the real flow leaves no work dir or checkpoints, and applies retention."""

import pytest

from flows.finetune import finetune
from tasks.cache_limit import cache_root
from tasks.storage import ArtifactStore, completed_runs, verify_run, write_manifest
from tests.conftest import tiny_run_config


@pytest.mark.slow
def test_completed_flow_run_removes_its_work_dir_and_old_runs(tiny_model_dir, tmp_path):
    # One whole tiny flow run (~20-40 s on 2 cores): the only way to see the end-of-run step in place.
    root = str(tmp_path / "artifacts")
    old = ArtifactStore(root).child("runs", "00000000-old")
    old.write_json("config.json", {})
    write_manifest.fn(old.uri, {"run_id": "00000000-old"})
    # A training seed of its own: this run trains (no cache hit), so it had checkpoints and a work dir.
    config = tiny_run_config(tiny_model_dir, root, output={"run_id": "retention-flow", "keep_runs": 1},
                             training={"seed": 4242})

    summary = finetune(config=config)

    assert not (cache_root() / "work" / "retention-flow").exists()
    run = ArtifactStore(summary["run"])
    files = run.list_files()
    assert not any(f.startswith("checkpoints/") for f in files)
    assert "model/model.safetensors" in files and any(f.startswith("wandb/") for f in files)
    assert completed_runs(root) == ["retention-flow"]  # keep_runs=1: the older completed run went
    assert not old.exists("manifest.json")
    verify_run(run.uri)  # nothing the manifest lists was touched by the clean-up


def test_a_failed_flow_run_applies_retention_too(tiny_model_dir, tmp_path):
    """Nights that keep failing must not each leave a folder for good: retention runs after a failed
    run as after a completed one (the flow's on_failure hook)."""
    import os
    import time
    from pathlib import Path

    from prefect.states import State

    root = str(tmp_path / "artifacts")
    for night in (1, 2, 3):  # three failed nights, two days ago and before
        run = ArtifactStore(root).child("runs", f"failed-{night}")
        run.write_json("config.json", {})
        run.write_json("status.json", {"state": "failed"})
        for path in Path(run.uri).rglob("*"):
            os.utime(path, (time.time() - (5 - night) * 24 * 3600,) * 2)
    config = tiny_run_config(tiny_model_dir, root, output={"keep_runs": 1, "keep_incomplete_hours": 1},
                             data={"dataset": str(tmp_path / "no-such-data.jsonl")})

    state: State = finetune(config=config, return_state=True)

    assert state.is_failed()
    assert sorted(p.name for p in (tmp_path / "artifacts" / "runs").iterdir()) == ["failed-3"]
