"""Serve smolflow's deployments from this process: a nightly fine-tune, an on-demand one, and
the arena, triggered by each completed nightly run.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.serve [--config FILE] [settings ...]

`flow.serve` needs no work pool or worker: this process registers the deployments, polls the
server and runs each flow run as a subprocess. Both deployments take the RunConfig as their
parameter, so the Prefect UI shows its form with descriptions, defaults and validation. Stopping
this process leaves both deployments and the nightly schedule active (docs/operations.md, "Serving and restarts");
with SMOLFLOW_ALERT_BLOCK set it (re)creates the alert automations first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

from prefect import serve
from prefect.events import DeploymentEventTrigger
from prefect.types.entrypoint import EntrypointType

from deployments.alerts import BLOCK_ENV, ensure_alerts
from deployments.local import descendants, folder_problem, next_nightly, nightly_schedule
from flows.arena import arena
from flows.finetune import finetune
from tasks.config import OutputConfig
from tasks.config_args import serve_config
from tasks.leftovers import own_temp_root
from tasks.locks import ensure_limits
from tasks.runtime import RUN_TIMEOUT_ENV, run_timeout


_DEFAULT_ROOT = OutputConfig.model_fields["artifacts_uri"].default
NIGHTLY_ROOT = ("{% if flow_run %}{{ flow_run.parameters.get('config', {}).get('output', {}).get('artifacts_uri', '"
                + _DEFAULT_ROOT + "') }}{% else %}" + _DEFAULT_ROOT + "{% endif %}")


# By module (flows.finetune.finetune), not by file path relative to this process's folder: that is
# the user's folder (deployments/local.py), and the entrypoint the UI shows is the same from any.
BY_MODULE = EntrypointType.MODULE_PATH


def deployments(settings: tuple[dict, dict] = ({}, {})):
    """The deployments; `settings` (tasks.config_args.serve_config): the parameters of the nightly
    and the defaults of the on-demand form, and those of the arena. Given at each start, as Prefect's
    serve replaces a deployment's parameters then (an edit made in the UI would not survive a restart)."""
    finetuning, arena_settings = settings
    nightly = finetune.to_deployment(
        parameters=finetuning,
        name="nightly", entrypoint_type=BY_MODULE,
        schedules=[nightly_schedule()],
        concurrency_limit=1,  # two nightly fine-tunes never train at once on one machine
        tags=["smolflow", "nightly"],
        description="Nightly fine-tune and evaluation on the embedded defaults.",
    )
    on_demand = finetune.to_deployment(
        parameters=finetuning,
        name="on-demand", entrypoint_type=BY_MODULE,
        concurrency_limit=1,
        tags=["smolflow", "on-demand"],
        description="Run from the Prefect UI's Run button with any parameters.",
    )
    # The arena re-rates the models whenever a nightly run completes (its new model joins the
    # battles), through an event trigger on that deployment; it can also be run by hand.
    arena_config = arena_settings.get("config", {})
    root = finetuning.get("config", {}).get("output", {}).get("artifacts_uri")  # serve's, for a run by hand
    after_nightly = arena.to_deployment(
        name="after-nightly", entrypoint_type=BY_MODULE,
        parameters={"config": arena_config | ({"artifacts_uri": root} if root else {})},
        triggers=[DeploymentEventTrigger(
            expect={"prefect.flow-run.Completed"},
            match_related={"prefect.resource.role": "deployment", "prefect.resource.name": nightly.name},
            # The arena reads the runs where the nightly wrote them (rendered by the server from the
            # completed run's parameters), not the arena's own default root. These replace the
            # deployment's parameters: serve's arena settings go in again.
            parameters={"config": arena_config | {"artifacts_uri": NIGHTLY_ROOT}},
        )],
        concurrency_limit=1,
        tags=["smolflow", "arena"],
        description="Arena battles and Bradley-Terry leaderboard over the promoted, latest runs and the base.",
    )
    return [nightly, on_demand, after_nightly]


def end_with_supervisor(grace_s: float = 20) -> None:
    """When the process that started this one dies (`make serve` SIGKILLed), this one gets SIGTERM
    (PR_SET_PDEATHSIG) and Prefect's runner shuts down gracefully, but with the server gone too it
    kept retrying the API for minutes, and its flow run lived on. After `grace_s`, end it all."""
    supervisor = os.getppid()

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1)
        time.sleep(grace_s)
        for pid in descendants(os.getpid()):  # flow runs start sessions of their own
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-supervisor", daemon=True).start()


def lost_server_in_one_line() -> None:
    """A log record about a lost connection to the server (the websocket of Prefect's cancellation
    observer, a poll) says it in one line, without its traceback: when the server dies (kill -9, the
    OOM killer) the runner logged a 30-line websocket traceback in the moment before the supervisor
    stopped it, after its own one-line error. Every record this process makes, whatever logs it."""
    import httpx
    from websockets.exceptions import ConnectionClosed

    make = logging.getLogRecordFactory()

    def record(*args, **kwargs) -> logging.LogRecord:
        r = make(*args, **kwargs)
        err = r.exc_info[1] if r.exc_info else None
        if isinstance(err, (ConnectionClosed, httpx.TransportError, ConnectionError)):
            try:
                r.msg, r.args = f"{r.getMessage()} ({type(err).__name__}: {err})", ()
            except Exception:  # a record whose arguments do not fit its message: left for logging to report
                return r
            r.exc_info, r.exc_text = None, None
        return r

    logging.setLogRecordFactory(record)


def lost_server(err: BaseException) -> bool:
    """Whether `err` came of the server going away: the runner wraps what it met starting (its event
    emitter's websocket to a server killed meanwhile) in a RuntimeError of its own."""
    import httpx
    from websockets.exceptions import WebSocketException

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (WebSocketException, httpx.TransportError, ConnectionError)):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def default_run_timeout(hours: str = "23") -> None:
    """A served run that hangs (a stuck endpoint, a deadlocked worker) would hold its deployment's one
    slot for good, and every later nightly would wait behind it with no alert: unless told otherwise
    (SMOLFLOW_RUN_TIMEOUT_HOURS, 0 for no limit), served runs end TimedOut after 23 hours, before the
    next nightly is due. The flow runs read it when they import their flow (tasks/runtime.py)."""
    os.environ.setdefault(RUN_TIMEOUT_ENV, hours)
    run_timeout()  # a bad value: one line now, not a traceback in every flow run


if __name__ == "__main__":
    # This process's temporary files (the Prefect runner's runner_storage/<uuid>, what the flows'
    # libraries make in it) in a folder of its own, which the next smolflow process removes when this
    # one was SIGKILLed (the out-of-memory killer) and cleaned nothing up.
    own_temp_root()
    end_with_supervisor()
    lost_server_in_one_line()
    try:
        default_run_timeout()
        nightly_schedule()
    except ValueError as err:
        sys.exit(f"error: {err}")
    if problem := folder_problem():
        sys.exit(f"error: {problem}")
    try:
        settings = serve_config(sys.argv[1:])
    except ValueError as err:  # UserError: where and what to change, one message
        sys.exit(f"error: {err}")
    try:
        if os.environ.get(BLOCK_ENV):  # alerts through the user's notification block (deployments/alerts.py)
            try:
                ensure_alerts()
            except ValueError as err:
                sys.exit(f"error: {err}")  # exit status 1, one line, no traceback
        # The runs' locks (tasks/locks.py) exist before any run: two runs starting together each created
        # them, and the loser's insert left an IntegrityError traceback in the server's log.
        ensure_limits()
        # Prefect's default pauses every schedule on shutdown (and drops the scheduled runs), so a
        # restart would silently end the nightly: a stopped serve process leaves the deployments as they are.
        served = deployments(settings)
        # What an operator checks first: when the nightly runs, and where its runs go
        root = settings[0].get("config", {}).get("output", {}).get("artifacts_uri") or _DEFAULT_ROOT
        schedule = served[0].schedules[0].schedule
        print(f"Nightly: '{schedule.cron}' ({schedule.timezone}), next run {next_nightly(schedule)}; "
              f"runs go to {root} (from {os.getcwd()})", flush=True)
        serve(*served, pause_on_shutdown=False)
    except Exception as err:  # the server killed (the supervisor says so): one line, not 60 of traceback
        if not lost_server(err):
            raise
        sys.exit(f"error: the deployments stopped: the Prefect server stopped answering ({type(err).__name__}: {err})")
