"""Serve smolflow's deployments from this process: a nightly fine-tune and an on-demand one.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.serve

`flow.serve` needs no work pool or worker: this process registers the deployments, polls the
server and runs each flow run as a subprocess. Both deployments take the RunConfig as their
parameter, so the Prefect UI shows its form with descriptions, defaults and validation. Stopping
this process leaves both deployments and the nightly schedule active (docs/operations-serve.md);
with SMOLFLOW_ALERT_BLOCK set it (re)creates the alert automations first.
"""

from __future__ import annotations

import os
import sys

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule

from deployments.alerts import BLOCK_ENV, ensure_alerts
from flows.finetune import finetune


def deployments():
    nightly = finetune.to_deployment(
        name="nightly",
        schedules=[CronSchedule(cron=os.environ.get("SMOLFLOW_NIGHTLY_CRON", "0 2 * * *"),
                                timezone=os.environ.get("SMOLFLOW_TIMEZONE", "UTC"))],
        concurrency_limit=1,  # two nightly fine-tunes never train at once on one machine
        tags=["smolflow", "nightly"],
        description="Nightly fine-tune and evaluation on the embedded defaults.",
    )
    on_demand = finetune.to_deployment(
        name="on-demand",
        concurrency_limit=1,
        tags=["smolflow", "on-demand"],
        description="Run from the Prefect UI's Run button with any parameters.",
    )
    return [nightly, on_demand]


if __name__ == "__main__":
    if os.environ.get(BLOCK_ENV):  # alerts through the user's notification block (deployments/alerts.py)
        try:
            ensure_alerts()
        except ValueError as err:
            sys.exit(f"error: {err}")  # exit status 1, one line, no traceback
    # Prefect's default pauses every schedule on shutdown (and drops the scheduled runs), so a
    # restart would silently end the nightly: a stopped serve process leaves the deployments as they are.
    serve(*deployments(), pause_on_shutdown=False)
