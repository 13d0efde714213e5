"""Benchmarks on Ray (`execution.task_runner: ray`): every job submitted at once, longest first, to
prefect-ray's RayTaskRunner on a cluster of the run's own or the one `execution.ray_address` names;
the run's settings go to the workers, and nothing of a local cluster is left after it (its session
folder), nor of a stop (a SIGTERM still ends the run as stopped)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tasks.benchmarks import REGISTRY
from tasks.config import ExecutionConfig
from tasks.leftovers import processes_under
from tasks.runtime import run_logger

# What a Ray worker needs of this process's environment to load the same models the same way and
# report to the same Prefect server (without PREFECT_API_URL each worker starts a server of its own).
_FORWARD = ("SMOLFLOW_EXECUTION", "SMOLFLOW_CACHE", "XDG_CACHE_HOME", "SMOLFLOW_SANDBOX_HIDE", "HF_HUB_OFFLINE",
            "HF_DATASETS_OFFLINE", "HF_HOME", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "TOKENIZERS_PARALLELISM",
            "WANDB_MODE")


def ray_runner(execution: ExecutionConfig):
    """prefect-ray's RayTaskRunner: joins `ray_address`, or starts a local cluster for the scoring
    (stopped after it), with this process's settings forwarded to its workers."""
    from prefect.settings import get_current_settings
    from prefect_ray import RayTaskRunner

    env = {k: os.environ[k] for k in _FORWARD if k in os.environ}
    api = get_current_settings().api.url or _temporary_server(execution)
    if api:
        env["PREFECT_API_URL"] = str(api)
    init = {"include_dashboard": False, "runtime_env": {"env_vars": env}}
    if execution.ray_num_cpus and not execution.ray_address:
        init["num_cpus"] = execution.ray_num_cpus
    # No address: a cluster of the run's own ("local"). A bare ray.init() joins any cluster that
    # `ray start` left running on this machine, and the run then removed that cluster's session folder.
    return RayTaskRunner(address=execution.ray_address or os.environ.get("RAY_ADDRESS") or "local", init_kwargs=init)


def _temporary_server(execution: ExecutionConfig) -> str | None:
    """The temporary Prefect server this process reports to when no PREFECT_API_URL is set, for a
    local cluster's workers: without it each worker started a temporary server of its own (seconds
    of CPU per worker) and the benchmark task runs went there, missing from the flow's server."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's client starts when no API URL is set
    if not server.running:
        return None
    if execution.ray_address:  # workers on other machines cannot reach 127.0.0.1
        run_logger().warning(
            "execution.ray_address=%s: the cluster's workers cannot reach this process's temporary Prefect "
            "server, so they report the benchmark task runs to temporary servers of their own; set "
            "PREFECT_API_URL to a server every machine reaches to see them", execution.ray_address)
        return None
    return server.api_url


def work(params: dict) -> float:
    """Estimated work of a job (items x cost per item), to submit the longest first."""
    if "cfg" in params:
        return REGISTRY[params["cfg"].name].work(params["cfg"]) / params.get("part", (0, 1))[1]
    return 2.0 * len(params["bench"].selected())  # a custom benchmark: short 0-shot generations


def submission_order(jobs) -> list[int]:
    """Job indices longest first (ties in job order): with every task queued at once, a long task
    that starts last leaves the other workers idle while it runs (GSM8K behind MMLU's shards)."""
    return sorted(range(len(jobs)), key=lambda i: -work(jobs[i][2]))


def score_on_ray(execution, jobs, models, parts, bar) -> None:
    """Submit every job for every model at once, longest first; collect the results in job order
    (a benchmark's shards in subset order)."""
    import ray
    from prefect_ray.context import remote_options

    runner = ray_runner(execution)
    with stops_kept() as keep, _session_removed(runner), runner:  # the cluster stops first, then its folder goes
        keep()  # ray.init() put its own SIGTERM handler (sys.exit) in place of the run's
        # One GPU per task where the cluster has GPUs; else Ray's default share of one CPU.
        gpus = ray.cluster_resources().get("GPU", 0)
        run_logger().info("Scoring %d benchmark tasks on Ray (%s)", len(models) * len(jobs), ray.cluster_resources())
        with remote_options(**({"num_gpus": 1} if gpus else {"num_cpus": 1})):
            futures = {(i, role): runner.submit(jobs[i][1], {"model_ref": model, "role": role, **jobs[i][2]})
                       for i in submission_order(jobs) for role, model in models.items()}
        done = 0
        for i, (name, _, _) in enumerate(jobs):
            for role in models:
                parts[(name, role)].append(futures[(i, role)].result())
                done += 1
                bar.update(done, f"{name}: " + ("the model" if role == "model" else f"the {role} model") + " scored")


@contextmanager
def _session_removed(runner):
    """Remove the session folder of the local cluster `runner` started (its logs and sockets, in
    RAY_TMPDIR/ray or /tmp/ray) once the cluster has stopped. Ray keeps every session's folder, so a
    nightly on a local cluster grew /tmp by ~0.5 MB a night. A joined cluster's is not ours."""
    try:
        yield
    finally:
        context = getattr(runner, "_ray_context", None)  # ray.init's RayContext, which prefect-ray keeps
        # Only "local" started a cluster: any other address joined one, whose session is not ours.
        started = runner.address == "local" and getattr(runner, "_owns_ray", False)
        if context is not None and started:
            _remove_session(Path(context.address_info["session_dir"]))


def _remove_session(session: Path) -> None:
    """The session folder, once no process names it any more, and Ray's link to it as the latest."""
    deadline = time.monotonic() + 30  # ray.shutdown() signals its processes; they exit soon after
    while processes_under(str(session)) and time.monotonic() < deadline:
        time.sleep(0.2)
    shutil.rmtree(session, ignore_errors=True)
    latest = session.parent / "session_latest"
    if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
        latest.unlink(missing_ok=True)


@contextmanager
def stops_kept():
    """A SIGTERM while scoring on Ray (kill, a cancel in Prefect, a stopped worker) ends the run as
    'stopped', as it does elsewhere, not 'failed (SystemExit: 1)'. ray.init() replaces the run's
    SIGTERM handler with its own (sys.exit) and ray.shutdown() leaves it there; and what a handler
    raises inside Ray's waiting code comes out as SystemExit or SystemError. So the caller puts the
    run's handler back once Ray is up (the function this yields), the signal is noted, and what the
    wait raises after it becomes Prefect's TerminationSignal (tasks/runs.py stop_reason)."""
    from prefect.exceptions import TerminationSignal

    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield lambda: None
        return
    ours, received = signal.getsignal(signal.SIGTERM), []

    def noted(signum, frame):
        received.append(signum)
        if callable(ours):
            ours(signum, frame)  # the run's own: Prefect's TerminationSignal, or the CLI's SystemExit
        elif ours != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    try:
        yield lambda: signal.signal(signal.SIGTERM, noted)
    except BaseException as err:
        if received and not isinstance(err, TerminationSignal):
            raise TerminationSignal(signal=received[0]) from err
        raise
    finally:
        signal.signal(signal.SIGTERM, ours)
