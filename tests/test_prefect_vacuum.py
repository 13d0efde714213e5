"""A nightly from cron (`smolflow run`, no Prefect server) keeps its Prefect database bounded: the
temporary server never runs Prefect's flow-run vacuum (only the events one), so every night's flow
run, task runs, states and logs stayed in PREFECT_HOME/prefect.db for good. Real temporary
servers and a real SQLite database; ~30-40 s (two temporary servers start)."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import prefect_home

ROOT = Path(__file__).resolve().parents[1]

TWO_RUNS = """
from prefect import flow, get_run_logger

@flow
def night():
    get_run_logger().info("a night's log line")

night()
night()
"""

# A nightly that fails on its inputs (a missing model) still starts like any other: the vacuum
# runs before the inputs are checked, so a week of failing nights is bounded too.
FAILING_NIGHT = """
import sys
from flows.finetune import finetune
from tasks.config import RunConfig

config = RunConfig.model_validate({"model": sys.argv[1] + "/no-model", "output": {"artifacts_uri": sys.argv[1] + "/runs"},
                                   "wandb": {"mode": "disabled"}})
try:
    finetune(config=config)
except Exception as err:
    print("failed as expected:", type(err).__name__)
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # a temporary server
    return env | {"PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                  "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
                  "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs"}  # smolflow's default


def _run(script: str, home: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=home.parent, env=_env(home),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rows(db: Path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, params).fetchall()


def test_a_run_without_a_server_deletes_flow_runs_past_the_vacuum_retention(tmp_path):
    home = prefect_home(tmp_path / "prefect-home")
    _run(TWO_RUNS, home)
    db = home / "prefect.db"
    runs = [r[0] for r in _rows(db, "select id from flow_run order by end_time")]
    assert len(runs) == 2
    old, recent = runs
    # The first night ended 100 days ago: past the vacuum's retention period (90 days).
    with sqlite3.connect(db) as con:
        con.execute("update flow_run set end_time = datetime('now', '-100 days') where id = ?", (old,))
    assert _rows(db, "select count(*) from log where flow_run_id = ?", old)[0][0] > 0

    _run(FAILING_NIGHT, home, str(tmp_path))

    left = {r[0] for r in _rows(db, "select id from flow_run")}
    assert old not in left, "a flow run past the retention period stayed in the temporary server's database"
    assert recent in left and len(left) == 2  # the recent night and the failing night itself stay
    assert _rows(db, "select count(*) from log where flow_run_id = ?", old)[0][0] == 0  # its logs went too
    assert _rows(db, "select count(*) from log where flow_run_id = ?", recent)[0][0] > 0
