"""Deployments on a real Prefect server: registered, scheduled nightly, run from the API the
UI's Run button uses, and bad parameters rejected with the field named."""

import socket
import time
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.local import start_server, start_serving, stop
from tasks.storage import ArtifactStore
from tests.conftest import prefect_home, tiny_run_config
from tests.test_flow import check_run_folder

TIMEZONE = "America/New_York"  # not UTC, so a wrong timezone would show


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real `prefect server start` plus deployments/serve.py, both on this machine."""
    import os

    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    os.environ["SMOLFLOW_TIMEZONE"] = TIMEZONE
    (tmp / "work").mkdir()  # served from a user's folder, not the checkout: runs go there
    # The nightly's settings, as `smolflow serve --config FILE --section.field VALUE` passes them.
    (tmp / "work" / "nightly.yaml").write_text("training:\n  max_steps: 7\narena:\n  judge:\n    enabled: false\n",
                                                encoding="utf-8")
    server = start_server(port, home=prefect_home(tmp / "home"), log=tmp / "server.log")
    serving = start_serving(port, home=tmp / "home", log=tmp / "serve.log", cwd=tmp / "work",
                            settings=["--config", "nightly.yaml", "--benchmarks", '[{"name": "gsm8k", "limit": 3}]',
                                      "--arena.max-battles", "2"])
    api = f"http://127.0.0.1:{port}/api"
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    nightly = client.read_deployment_by_name("smolflow-finetune/nightly")
                    on_demand = client.read_deployment_by_name("smolflow-finetune/on-demand")
                    client.read_deployment_by_name("smolflow-arena/after-nightly")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise AssertionError((tmp / "serve.log").read_text()[-3000:])
                    time.sleep(1)
            yield client, nightly, on_demand, tmp / "work"
    finally:
        os.environ.pop("SMOLFLOW_TIMEZONE", None)
        stop(serving)
        stop(server)


def test_nightly_schedule_produces_runs_at_two_am_local_time(served):
    client, nightly, _, _ = served
    assert nightly.schedules and nightly.schedules[0].schedule.cron == "0 2 * * *"
    assert nightly.schedules[0].schedule.timezone == TIMEZONE
    assert nightly.global_concurrency_limit.limit == 1  # two nightly runs never train at once
    # The runs' locks exist before any run (this module's first test): two runs starting together each
    # created them, the loser's insert an IntegrityError traceback in the server's log.
    names = {limit.name for limit in client.read_global_concurrency_limits()}
    assert {"smolflow-training", "smolflow-promotion"} <= names, names
    deadline = time.monotonic() + 90
    while not (runs := client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
    )):
        assert time.monotonic() < deadline, "the scheduler produced no upcoming nightly runs"
        time.sleep(2)
    assert all(r.parameters == nightly.parameters for r in runs)  # each night runs serve's settings
    starts = sorted(r.expected_start_time for r in runs)
    for start in starts:
        local = start.astimezone(ZoneInfo(TIMEZONE))
        assert (local.hour, local.minute) == (2, 0), start
    assert all(b - a == timedelta(days=1) for a, b in zip(starts, starts[1:]) if a.utcoffset() == b.utcoffset())


def test_form_schema_has_descriptions_and_defaults(served):
    _, nightly, on_demand, _ = served
    schema = on_demand.parameter_openapi_schema
    config = schema["definitions"]["TrainingConfig"]["properties"]
    assert config["max_steps"]["default"] == 30 and "description" in config["max_steps"]
    assert "RunConfig" in schema["definitions"]
    # What serve was given (file, then flags) is the nightly's parameter and the Run form's start;
    # only the settings given: the rest stay the code's defaults.
    given = {"config": {"training": {"max_steps": 7}, "benchmarks": [{"name": "gsm8k", "limit": 3}]}}
    assert nightly.parameters == on_demand.parameters == given


def test_bad_parameters_from_the_ui_are_rejected_naming_the_field(served):
    client, _, on_demand, _ = served
    with pytest.raises(Exception) as err:
        client.create_flow_run_from_deployment(
            on_demand.id, parameters={"config": {"training": {"learning_rate": "fast"}}}
        )
    assert "learning_rate" in str(err.value)


def _flow_run_processes(flow_run_id) -> list[int]:
    """Pids of processes running this flow run (Prefect's runner gives each its id in the environment)."""
    from tasks.leftovers import _environ

    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and _environ(int(entry.name)).get(b"PREFECT__FLOW_RUN_ID") == str(flow_run_id).encode():
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def _run_log(client, run_id) -> str:
    """The flow run's log as the Prefect UI shows it (for a failing test's message)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
    return "\n".join(f"{entry.timestamp:%H:%M:%S.%f} {entry.name}: {entry.message}" for entry in logs)[-6000:]


def _wait_final(client, run_id, within_s: float):
    deadline = time.monotonic() + within_s
    while not (run := client.read_flow_run(run_id)).state.is_final():
        assert time.monotonic() < deadline, f"flow run still {run.state.name}:\n{_run_log(client, run_id)}"
        time.sleep(1)
    return run


@pytest.mark.slow
def test_a_run_cancelled_while_training_stops_says_so_and_frees_the_slot(served, tiny_model_dir, tmp_path):
    """Cancel in the UI (the API call its button makes) while the model trains: the run's process
    ends, the run folder says 'stopped' (it said 'failed: prefect.exceptions.TerminationSignal'),
    and the deployment's one slot is free for the next run."""
    from prefect.client.schemas.filters import FlowRunFilterId
    from prefect.states import Cancelling

    client, _, on_demand, _ = served
    artifacts = str(tmp_path / "artifacts")
    config = tiny_run_config(tiny_model_dir, artifacts, output={"run_id": "cancelled"}, judge={"enabled": False},
                             training={"max_steps": 2000, "eval_steps": 5000, "save_steps": 5000})
    run = client.create_flow_run_from_deployment(on_demand.id, parameters={"config": config.model_dump(mode="json")})
    deadline = time.monotonic() + 300
    while True:  # until training runs
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        if any(t.name.startswith("train_sft") and t.state and t.state.is_running() for t in tasks):
            break
        assert time.monotonic() < deadline and not client.read_flow_run(run.id).state.is_final(), (
            f"{tasks}\n{_run_log(client, run.id)}")
        time.sleep(1)
    assert _flow_run_processes(run.id)
    client.set_flow_run_state(run.id, Cancelling())
    final = _wait_final(client, run.id, 120).state
    assert final.is_cancelled(), f"{final.name}: {final.message}\n{_run_log(client, run.id)}"
    deadline = time.monotonic() + 30
    while (left := _flow_run_processes(run.id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
    status = ArtifactStore(artifacts).child("runs", "cancelled").read_json("status.json")
    assert status["state"] == "stopped" and status["why"].startswith("stopped by SIGTERM: cancelled in Prefect"), (
        f"{status}\n{_run_log(client, run.id)}")

    nxt = tiny_run_config(tiny_model_dir, artifacts, output={"run_id": "next"}, judge={"enabled": False})
    after = client.create_flow_run_from_deployment(on_demand.id, parameters={"config": nxt.model_dump(mode="json")})
    final = _wait_final(client, after.id, 300).state
    assert final.is_completed(), f"{final.name}: {final.message}\n{_run_log(client, after.id)}"


@pytest.mark.slow
def test_run_button_starts_a_run_with_changed_parameters(served, tiny_model_dir):
    client, _, on_demand, work = served
    assert on_demand.entrypoint == "flows.finetune.finetune"  # the same from any folder
    # A relative root (as the default ./smolflow-runs) is the folder serve was started from, where
    # `smolflow runs` looks; it was the checkout's (or site-packages', for a wheel).
    config = tiny_run_config(tiny_model_dir, "ui-artifacts", output={"run_id": "from-the-ui"})
    run = client.create_flow_run_from_deployment(on_demand.id, parameters={"config": config.model_dump(mode="json")})
    deadline = time.monotonic() + 420
    while not (run := client.read_flow_run(run.id)).state.is_final():
        assert time.monotonic() < deadline, f"flow run still {run.state.name}"
        time.sleep(2)
    assert run.state.is_completed(), run.state.message
    assert run.parameters["config"]["output"]["run_id"] == "from-the-ui"
    run_uri = ArtifactStore(str(work / "ui-artifacts")).child("runs", "from-the-ui").uri
    check_run_folder(run_uri)
    artifacts = {a.key: a for a in client.read_artifacts() if a.flow_run_id == run.id}
    assert {"smolflow-report", "smolflow-benchmarks"} <= set(artifacts)
    # The report's links are relative to the run folder, dead in the UI: there they name where the file lies.
    shown = artifacts["smolflow-report"].data
    assert "](../" not in shown and f"tuned model: `{run_uri}/model/`" in shown


@pytest.mark.slow
def test_arena_deployment_is_triggered_by_a_completed_nightly_run(served, tmp_path):
    import httpx
    from prefect.events import Event

    client, nightly, _, _ = served
    arena = client.read_deployment_by_name("smolflow-arena/after-nightly")
    arena_settings = {"judge": {"enabled": False}, "max_battles": 2}  # serve's --config file's `arena:` and a flag
    assert arena.parameters == {"config": arena_settings}  # a run by hand from the UI: serve's settings
    (automation,) = client.read_automations_by_name("after-nightly__automation_1")
    assert automation.trigger.expect == {"prefect.flow-run.Completed"}
    assert automation.actions[0].deployment_id == arena.id
    # A nightly run that wrote elsewhere than the default root (created finished: nothing runs it), and
    # what the server records when it completes; the automation answers with an arena run over its root.
    from prefect.states import Completed

    elsewhere = str(tmp_path / "nightly-root")
    done = client.create_flow_run_from_deployment(
        nightly.id, parameters={"config": {"output": {"artifacts_uri": elsewhere}}}, state=Completed())
    # Posted straight to this module's server (emit_event would use the process's events client).
    event = Event(event="prefect.flow-run.Completed", resource={"prefect.resource.id": f"prefect.flow-run.{done.id}"},
                  related=[{"prefect.resource.id": f"prefect.deployment.{nightly.id}",
                            "prefect.resource.role": "deployment", "prefect.resource.name": "nightly"}])
    httpx.post(str(client.api_url).rstrip("/") + "/events", json=[event.model_dump(mode="json")],
               timeout=30).raise_for_status()
    deadline = time.monotonic() + 120
    while not (runs := client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[arena.id])))):
        assert time.monotonic() < deadline, "no arena run 120 s after a nightly run completed"
        time.sleep(2)
    # the nightly's root, not the arena's default ./smolflow-runs; serve's arena settings kept
    assert runs[0].parameters["config"] == arena_settings | {"artifacts_uri": elsewhere}
