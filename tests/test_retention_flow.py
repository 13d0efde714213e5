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
    write_manifest(old.uri, {"run_id": "00000000-old"})
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


def test_a_run_whose_parameters_prefect_refused_applies_retention_without_a_warning(tiny_model_dir, tmp_path, caplog):
    """A bad value typed in the Run form (here a setting that would have no effect) fails the flow run
    at Prefect's parameter check; the failure hook then read the whole config, so it logged
    'Retention after the failed run did not run: ValidationError ...' and retention did not run."""
    import os
    import time
    from pathlib import Path

    from prefect.states import State

    root = str(tmp_path / "artifacts")
    for night in (1, 2):
        run = ArtifactStore(root).child("runs", f"failed-{night}")
        run.write_json("status.json", {"state": "failed"})
        for path in Path(run.uri).rglob("*"):
            os.utime(path, (time.time() - (4 - night) * 24 * 3600,) * 2)
    config = tiny_run_config(tiny_model_dir, root, output={"keep_runs": 1, "keep_incomplete_hours": 1}).model_dump(
        mode="json")
    config["training"]["num_train_epochs"] = 3  # used only when max_steps is -1: refused

    state: State = finetune(config=config, return_state=True)

    assert state.is_failed() and "num_train_epochs" in state.message
    assert "did not run" not in caplog.text
    assert sorted(p.name for p in (tmp_path / "artifacts" / "runs").iterdir()) == ["failed-2"]


def test_killed_nights_are_cleared_when_the_next_run_starts(tiny_model_dir, tmp_path, monkeypatch):
    """A SIGKILLed night (the OOM killer, a reboot) runs no hook: its run folder and work dir of
    checkpoints stayed for good, a night at a time. The next run applies retention before its
    first write, never to its own folder (a re-run of an old run id resumes its checkpoints)."""
    import os
    import time
    from pathlib import Path

    import flows.finetune
    from tasks.config import OutputConfig
    from tasks.bookkeeping import tidy_before_run

    root = str(tmp_path / "artifacts")
    for night in (1, 2, 3, 4):  # killed mid-training, days ago: status 'running' for ever, checkpoints
        run = ArtifactStore(root).child("runs", f"killed-{night}")
        run.write_json("config.json", {})
        run.write_json("status.json", {"state": "running"})
        run.write_text("checkpoints/checkpoint-4/model.safetensors", "x" * 1000)
        work = cache_root() / "work" / f"killed-{night}"
        (work / "checkpoint-4").mkdir(parents=True)
        (work / "checkpoint-4" / "model.safetensors").write_text("x" * 1000)
        for path in [*Path(run.uri).rglob("*"), *work.rglob("*"), work]:
            os.utime(path, (time.time() - (6 - night) * 24 * 3600,) * 2)
    tidy_before_run(OutputConfig(artifacts_uri=root, keep_runs=1, keep_incomplete_hours=1), "killed-1")
    left = sorted(p.name for p in (tmp_path / "artifacts" / "runs").iterdir())
    assert left == ["killed-1", "killed-4"]  # the newest, and the one being started again
    assert sorted(p.name for p in (cache_root() / "work").glob("killed-*")) == ["killed-1", "killed-4"]  # resumable

    # The flow does it first thing, before anything of the new run is written.
    seen = []

    def first(output, run_id):
        seen.append((run_id, (Path(root) / "runs" / run_id).exists()))
        raise RuntimeError("stop here")

    monkeypatch.setattr(flows.finetune, "tidy_before_run", first)
    config = tiny_run_config(tiny_model_dir, root, output={"run_id": "next-night"})
    assert finetune(config=config, return_state=True).is_failed()
    assert seen == [("next-night", False)]
