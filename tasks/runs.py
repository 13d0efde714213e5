"""Reading runs back: each run's status, scores and losses, the root they are under, a run's model
(the listing and the side-by-side of `smolflow runs` / `compare`: tasks/run_table.py).

A run folder says where it stands: `manifest.json` (complete) > `status.json` saying failed or
stopped (why, when) > anything else (incomplete: running, or killed before it could say so).
"""

from __future__ import annotations

import os
import re
import signal
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable

from tasks.config import OutputConfig
from tasks.layout import RUNS, RunPaths, new_run_id, run_dir
from tasks.leftovers import process_gone, process_mark
from tasks.run_ending import ending_enforced
from tasks.runtime import RUN_TIMEOUT_ENV, run_logger
from tasks.storage import ArtifactStore, StorageError

# What the flows name their runs: `<UTC date>-<time>-<flow run name>`, `eval-` first for smolflow eval.
RUN_ID = re.compile(r"(eval-)?\d{8}-[\w-]*")


def write_status(run: ArtifactStore, state: str, why: str | None = None, **extra) -> None:
    """status.json: running / failed (with why) / complete, and when."""
    run.write_json(RunPaths.status, {"state": state, "why": why, "at": datetime.now(timezone.utc).isoformat(), **extra})


def failure_reason(err: BaseException) -> str:
    """One line for a status file: the error's own message, not a traceback."""
    if type(err).__name__ == "CancelledError" and type(err).__module__.startswith("prefect."):
        # What the flow's own code sees when Prefect's flow timeout fires (tasks/runtime.py run_timeout).
        hours = os.environ.get(RUN_TIMEOUT_ENV, "")
        return f"timed out: the run took longer than {RUN_TIMEOUT_ENV}={hours} h" if hours else "cancelled by Prefect"
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {message}" if message else "".join(traceback.format_exception_only(err)).strip()


def stop_reason(err: BaseException) -> str | None:
    """Why a run that was stopped on purpose stopped (Ctrl-C, a cancel in Prefect); None: it failed."""
    from prefect.exceptions import TerminationSignal

    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGINT)"
    if isinstance(err, TerminationSignal):  # Prefect's cancel, or serve/worker stopped, send SIGTERM
        return (f"stopped by {signal.Signals(err.signal).name}: cancelled in Prefect, or the process "
                "running it was stopped")
    return None


def flow_run_id(root: str, prefix: str = "") -> str:
    """A new run's id (`prefix`, the time, the flow run's name), stamped with the time its flow run
    first started, not this attempt's: the flow run page's Retry runs the same flow run again, and
    with the same id it carries on in the earlier attempt's folder (its checkpoints: training resumes;
    its W&B run; its status), as a re-run with that `output.run_id` does, rather than training from
    step 0 in a new folder beside a stopped one. A retried run that had completed gets a new id:
    run folders are written once."""
    from prefect.context import FlowRunContext
    from prefect.runtime import flow_run

    context = FlowRunContext.get()
    if started := context and context.flow_run and context.flow_run.start_time:
        run_id = new_run_id(f"{prefix}{started.astimezone(timezone.utc):%Y%m%d-%H%M%S}", flow_run.get_name())
        if not ArtifactStore(root).child(run_dir(run_id)).exists(RunPaths.manifest):
            return run_id
    return new_run_id(f"{prefix}{datetime.now(timezone.utc):%Y%m%d-%H%M%S}", flow_run.get_name())


def run_status(run: ArtifactStore) -> dict[str, Any]:
    """{'state': complete | failed | stopped | incomplete, 'why', 'at'} of one run folder."""
    if run.exists(RunPaths.manifest):
        manifest = run.read_json(RunPaths.manifest)
        return {"state": "complete", "why": None, "at": manifest.get("completed_at")}
    status = run.read_json(RunPaths.status) if run.exists(RunPaths.status) else {}
    if status.get("state") in ("failed", "stopped"):
        return status
    if status.get("state") == "running":
        # A SIGKILL, the out-of-memory killer or a power cut leaves "running" for good: the process
        # that wrote it says whether it still lives, where this reader can see it (tasks/leftovers.py).
        who = f"pid {status.get('pid')} on {status.get('host')}, started {status.get('started_at')}"
        gone = process_gone(status)
        if gone:
            return {**status, "state": "failed", "at": None,
                    "why": f"killed: its process ended without a word (SIGKILL, the out-of-memory killer, or "
                           f"the machine restarted): {who}"}
        if gone is False:
            return {**status, "state": "incomplete", "why": f"running ({who})", "at": None}
        if status.get("pid"):
            return {**status, "state": "incomplete", "at": None,
                    "why": f"no manifest: running ({who}; not this machine, which cannot tell), or killed there"}
    return {"state": "incomplete", "why": "no manifest: still running, or stopped before it could finish", "at": None}


FLOW_RUN = "prefect_flow_run"  # status.json: the id of the Prefect flow run that wrote it


def end_killed_flow_runs(root: str, running: str | None = None) -> list[str]:
    """The Prefect flow runs of runs under `root` killed outright on this machine (run_status: 'killed:
    ...'), where this server still has them unfinished: set Crashed, with the run's why. A SIGKILL (the
    out-of-memory killer, a reboot) runs no hook, and nothing else ends them: a killed cron night said
    Running in the Prefect UI for good (a served one is ended by the process that serves it). Flow
    runs this server does not know (another server's, vacuumed) are left alone. Returns the run ids
    whose flow runs it ended."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    store = ArtifactStore(root)
    killed = {}
    for rel in store.glob("runs/*/status.json") if store.exists("runs") else ():
        run_id = rel.split("/")[1]
        try:
            status = run_status(store.child("runs", run_id))
        except (FileNotFoundError, ValueError):
            continue  # written or removed between the listing and the read: the next run sees it
        if run_id != running and status.get(FLOW_RUN) and str(status.get("why") or "").startswith("killed: "):
            killed[run_id] = status
    ended = []
    if killed:
        with get_client(sync_client=True) as client:
            for run_id, status in killed.items():
                try:
                    state = client.read_flow_run(UUID(str(status[FLOW_RUN]))).state
                except (ObjectNotFound, ValueError):
                    continue
                if state is not None and not state.is_final():
                    client.set_flow_run_state(status[FLOW_RUN], Crashed(message=f"run {run_id}: {status['why']}"),
                                              force=True)
                    ended.append(run_id)
    return ended


def _read(run: ArtifactStore, rel: str, default=None):
    return run.read_json(rel) if run.exists(rel) else default


def headline(run: ArtifactStore) -> dict[str, float]:
    """{benchmark: the tuned model's score} (or the evaluated model's, for an eval run)."""
    table = _read(run, RunPaths.comparison)
    if table:
        return {r["benchmark"]: r["tuned"] for r in table}
    found = {}
    for rel in run.glob(f"{RunPaths.benchmarks}/**/model.summary.json"):
        summary = run.read_json(rel)
        found[summary.get("name", rel)] = round(summary["score"], 4)
    return found


def _summary(run: ArtifactStore, name: str) -> dict | None:
    """The tuned model's saved score (or the evaluated model's, for an eval run)."""
    return _read(run, RunPaths.benchmark_summary(name, "tuned")) or _read(run, RunPaths.benchmark_summary(name, "model"))


def sources(run: ArtifactStore) -> dict[str, str]:
    """{benchmark: where its items came from, and whether published scores compare}."""
    out = {}
    for name in headline(run):
        prov = (_summary(run, name) or {}).get("provenance") or {}
        out[name] = prov.get("note") or prov.get("source") or "unknown source"
    return out


def runs_root(root: str) -> ArtifactStore:
    """The store at `--root` of runs, compare and gc, or one line naming --root (exit 2) where it
    can hold no runs: a scheme output.artifacts_uri refuses, a local folder that is missing or a
    file, an S3 root whose credentials, endpoint or bucket do not work (a typo there once listed
    "no runs", exit 0). An existing folder without runs is a root with none yet."""
    try:
        OutputConfig._known_scheme(root)  # the same schemes as output.artifacts_uri
        store = ArtifactStore(root)
        # S3 only: check_access's local half would refuse a read-only folder, which can be listed. A
        # prefix first: exists() of a bucket alone says False for wrong credentials, which a prefix
        # says as they are (access denied), and a root with runs needs no more requests.
        if store.is_s3 and not store.exists(RUNS):
            store.check_access()
    except StorageError as err:
        raise StorageError(f"--root: {err}") from None
    except ValueError as err:
        raise ValueError(f"--root: {err}") from None
    if not store.is_s3 and not os.path.isdir(store.root):
        what = "is a file, not a folder" if os.path.exists(store.root) else "does not exist"
        raise FileNotFoundError(f"--root: {store.root} {what}. Give the folder the runs were written to "
                                "(their output.artifacts_uri)")
    return store


def losses(run: ArtifactStore) -> dict[str, float]:
    """{train_loss, eval_loss} of a run's training, rounded ({} for an eval run or before training ended)."""
    metrics = _read(run, RunPaths.metrics, {}) or {}
    return {k: round(metrics[k], 4) for k in ("train_loss", "eval_loss") if isinstance(metrics.get(k), (int, float))}


def model_of_run(root: str, run_id: str) -> dict[str, Any] | None:
    """The tuned model (a ModelRef's fields) of a completed run under root, or None if `run_id` names no
    run; ValueError if it has a run id's shape (RUN_ID) yet names neither a run nor a local folder."""
    if not run_id or "/" in run_id or run_id.startswith((".", "~")) or ":" in run_id:
        return None  # a path, a hub id (org/name) or builtin:...; not a run id
    store = ArtifactStore(root)
    run = store.child(RUNS, run_id)
    if not run.exists(RunPaths.config):
        if RUN_ID.fullmatch(run_id) and not os.path.exists(run_id):  # a mistyped run id, not a model
            raise ValueError(f"model={run_id!r}: no run {run_id!r} under {store.uri} (see "
                             "`smolflow runs`; output.artifacts_uri picks the root), nor a model folder of "
                             "that name here; a Hugging Face model is named org/name")
        return None
    status = run_status(run)
    if status["state"] != "complete":
        raise ValueError(f"model={run_id!r}: that run is {status['state']} ({status.get('why')}); "
                         "pick a completed run (see `smolflow runs`)")
    return run.read_json(RunPaths.manifest)["tuned_model"]


def served_as(run: ArtifactStore) -> str | None:
    """The Prefect deployment this run belongs to: this flow run's; on a resume with none (`smolflow run
    --output.run-id` of a served night) the one its earlier attempt ran under, as its status.json says."""
    from prefect.runtime import deployment

    if deployment.name:
        return deployment.name
    try:
        return run.read_json(RunPaths.status).get("deployment")
    except (FileNotFoundError, ValueError, AttributeError):  # a new run, or an unreadable earlier status
        return None


@contextmanager
def status_recorded(run: ArtifactStore, on_stop: Callable[[dict], None] | None = None, deployment: str | None = None):
    """status.json says 'running' during the block, 'failed' (why, when) if it raises, 'stopped' if
    it was interrupted or cancelled, 'complete' if it ends; the manifest, written before the end, is
    what marks a run complete for readers (run_status). on_stop gets that status (e.g. the W&B run
    says it too: tasks/tracking.py close_on_stop). `deployment` (served_as) is kept in every state, and
    the Prefect flow run's id, which ends a killed run's flow run (end_killed_flow_runs)."""
    from prefect.runtime import flow_run

    served = ({"deployment": deployment} if deployment else {}) | ({FLOW_RUN: flow_run.id} if flow_run.id else {})
    write_status(run, "running", started_at=datetime.now(timezone.utc).isoformat(), **served, **process_mark())
    started = run.read_json(RunPaths.status)["started_at"]
    try:
        with ending_enforced():  # a timeout or SIGTERM ends it, also where its exception was caught
            yield run
    except BaseException as err:
        stopped = stop_reason(err)
        write_status(run, "stopped" if stopped else "failed", stopped or failure_reason(err), started_at=started, **served)
        if on_stop is not None:
            try:
                on_stop(run.read_json(RunPaths.status))
            except Exception as also:  # never hides the run's own error, which status.json has
                run_logger().warning("After the run stopped: %s: %s", type(also).__name__, also)
        raise
    write_status(run, "complete", started_at=started, **served)
