"""status.json of a run that ends early: 'failed' with the error, or 'stopped' when someone stopped
it on purpose (Ctrl-C, a cancel in Prefect, which arrives as SIGTERM); `smolflow runs` shows which."""

import signal

import pytest
from prefect.exceptions import TerminationSignal

from tasks.runs import list_runs, status_recorded
from tasks.storage import ArtifactStore


def test_a_run_stopped_on_purpose_says_stopped_and_a_failed_one_says_why(tmp_path):
    root = ArtifactStore(str(tmp_path))
    for run_id, err in (("ctrl-c", KeyboardInterrupt()), ("cancelled", TerminationSignal(signal.SIGTERM)),
                        ("broken", ValueError("no such column 'messages'"))):
        run = root.child("runs", run_id)
        run.write_json("config.json", {})  # a run writes its config first (what `smolflow runs` lists)
        with pytest.raises(type(err)), status_recorded(run):
            raise err
    rows = {r["run_id"]: r for r in list_runs(str(tmp_path))}
    assert (rows["ctrl-c"]["status"], rows["ctrl-c"]["why"]) == ("stopped", "interrupted (Ctrl-C or SIGINT)")
    assert rows["cancelled"]["status"] == "stopped"
    assert rows["cancelled"]["why"].startswith("stopped by SIGTERM: cancelled in Prefect")
    assert (rows["broken"]["status"], rows["broken"]["why"]) == ("failed", "ValueError: no such column 'messages'")
