"""Benchmarks on Ray (`execution.task_runner: ray`): every job submitted at once, longest first, to
prefect-ray's RayTaskRunner on a cluster of the run's own or the one `execution.ray_address` names;
the run's settings go to the workers, and nothing of a local cluster is left after it (its session
folder), nor of a stop (a SIGTERM still ends the run as stopped)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

from tasks.benchmarks import REGISTRY
from tasks.config import ExecutionConfig
from tasks.leftovers import (descendants, process_gone, process_mark, processes_under, processes_using,
                             processes_with_environ, stop_processes, with_start_times)
from tasks.ray_watchdog import STARTING, guarding, remove_session
from tasks.run_ending import finishing, stop_noted
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
    address = execution.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # Its workers do the run's work at the run's priority. Ray starts them at nice 15, below
        # everything else on the machine: beside other work (2 busy cores) 8 tiny scoring tasks took
        # 6 min instead of ~10 s, and a CI test's scoring hung past 7 min. (A joined cluster keeps its own.)
        init["_system_config"] = {"worker_niceness": 0}
    return RayTaskRunner(address=address, init_kwargs=init)


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
    with stops_kept() as keep, _own_cluster_stopped(runner):  # a local cluster: all of it stopped, then its folder gone
        keep()  # the run's SIGTERM handler, whatever replaced it while Ray started
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


# A marker in the session folder of a cluster this process started: who started it (`process_mark`),
# so that a later run removes the folder once that process is gone (`reap_sessions`).
SESSION_MARK = "smolflow-owner.json"


def _started(runner) -> bool:
    """Whether `runner` started the cluster it uses: only "local" starts one; any other address
    joined one, whose processes and session are not ours."""
    return (runner.address == "local" and getattr(runner, "_owns_ray", False)
            and getattr(runner, "_ray_context", None) is not None)


def _session(runner) -> Path:
    return Path(runner._ray_context.address_info["session_dir"])  # ray.init's RayContext, which prefect-ray keeps


@contextmanager
def _own_cluster_stopped(runner):
    """Enter `runner` (ray.init) and leave it (ray.shutdown); when it started a local cluster, stop
    every process of that cluster and remove its session folder (logs, sockets) before going on.

    ray.shutdown() signals only the 5 processes ray.init started (GCS, raylet, autoscaler monitor,
    dashboard, log monitor: SIGTERM, up to 1 s, SIGKILL, one after the other); the raylet's children
    (dashboard and runtime-env agents, workers, what a task started) are the raylet's to stop, or
    exit when it is gone. Measured here (ray 2.60), all ~9 are gone when ray.shutdown() returns, in
    ~1.4 s, ~2 s on 2 loaded cores, workers ignoring SIGTERM or busy included. But nothing checked
    it: those children rename themselves (ray::IDLE, ray::DashboardAgent...), so the wait on
    `processes_under(session)` (up to 30 s) saw only the 5, and whatever outlived it stayed. So the
    cluster's processes are noted while it still runs (those naming the session and everything
    below them), and after ray.shutdown() whatever of them outlives a 2 s grace gets SIGTERM, then
    SIGKILL 2 s later: the run goes on once every one is gone (at most ~9 s after ray.shutdown()),
    and only then is the folder removed."""
    import ray

    if runner.address == "local":
        reap_sessions(_ray_root())  # what a SIGKILLed earlier run of ours left
    # A cluster this process is about to start: the session folders it has now, to tell the new one apart
    earlier = _sessions_of_this_process() if runner.address == "local" and not ray.is_initialized() else None
    starting = _note_starting() if earlier is not None else None
    own: dict[int, str] = {}
    raylets: list[int] = []
    # A SIGKILL of this process: what its cluster leaves is cleared by a watchdog at once, not a minute later
    with guarding(_ray_root()) if earlier is not None else nullcontext():
        try:
            with runner:
                try:
                    if _started(runner):
                        _mark_session(_session(runner))
                    if starting is not None:
                        starting.unlink(missing_ok=True)  # the session's own mark (or none started) says it now
                    yield
                finally:
                    if _started(runner):  # before ray.shutdown(): its processes, while the tree still holds them
                        with finishing():
                            nodes = processes_under(str(_session(runner)))
                            raylets = [pid for pid in nodes if _argv0(pid).endswith("/raylet")]
                            own = with_start_times(nodes) | descendants(*nodes)
        finally:
            with finishing():  # a stop raised again meanwhile comes after: the folder and the note go first
                _stop_own_cluster(runner, earlier, own, raylets)
                if starting is not None:
                    starting.unlink(missing_ok=True)


def _stop_own_cluster(runner, earlier: set[Path] | None, own: dict[int, str], raylets: list[int]) -> None:
    """What `_own_cluster_stopped` leaves with: the cluster's processes stopped, its folder gone."""
    import ray

    if _started(runner):
        if ray.is_initialized():  # runner's own ray.shutdown() was cut short by the stop
            ray.shutdown()
        # A worker the raylet was starting as the processes were noted: workers carry its pid.
        late = [p for r in raylets for p in processes_with_environ("RAY_RAYLET_PID", str(r))]
        session = _session(runner)
        # and whatever still holds the session: an agent the raylet's SIGKILL orphaned keeps its logs open
        signalled, left = stop_processes(own | with_start_times(late + processes_using(str(session))))
        if signalled:
            run_logger().info("Stopped %d process(es) of the local Ray cluster that outlived ray.shutdown(): "
                              "pids %s", len(signalled), signalled)
        if left:
            run_logger().warning("Processes of the local Ray cluster still running after SIGKILL (stuck in a "
                                 "system call): pids %s; its session folder %s is left for a later run",
                                 left, session)
        else:
            remove_session(session)
    elif earlier is not None:
        _half_started(earlier)


def _sessions_of_this_process() -> set[Path]:
    """Session folders of local clusters this process started: Ray names them session_<date>_<pid>."""
    return set(_ray_root().glob(f"session_*_{os.getpid()}"))


def _half_started(earlier: set[Path]) -> None:
    """A stop (SIGTERM, a cancel) that lands while ray.init() starts the run's own cluster, which
    takes several seconds (4-5 s on a 2-core machine): ray.init() never returned, so nothing called
    ray.shutdown(); the processes it had started went only when the run's process exited (Ray's
    exit hook), and the session folder, not yet marked as ours, stayed for good. Both go now."""
    import ray

    try:
        ray.shutdown()  # stops whatever of the cluster ray.init() had started; safe on a half-done init
    except Exception as err:  # noqa: BLE001 - the stop the run is ending with matters more; what is left is stopped below
        run_logger().warning("ray.shutdown() after a stop during ray.init() failed: %s", err)
    for session in _sessions_of_this_process() - earlier:
        held = with_start_times(pid for pid in processes_using(str(session)) if pid != os.getpid())
        signalled, left = stop_processes(held)
        if signalled:
            run_logger().info("Stopped %d process(es) of a local Ray cluster stopped while it started: pids %s",
                              len(signalled), signalled)
        if left:
            run_logger().warning("Processes of a local Ray cluster still running after SIGKILL (stuck in a system "
                                 "call): pids %s; its session folder %s is left", left, session)
        else:
            remove_session(session)


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


def _ray_root() -> Path:
    """Where a local cluster's session folders go: RAY_TMPDIR/ray, else (Linux) TMPDIR/ray, else
    /tmp/ray (Ray's own choice: ray._common.utils.get_default_ray_temp_dir, not public API)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(base or "/tmp") / "ray"


# A run about to start a local cluster says so first (tasks/ray_watchdog.py STARTING), in the folder
# the cluster's session will be in: a SIGKILL while ray.init() runs (4-5 s on a 2-core machine) left
# a session folder that no SESSION_MARK had been written to yet, for good. The note names the run's
# process, whose pid Ray puts into the session folder's name (session_<local time>_<pid>).


def _note_starting() -> Path | None:
    try:
        root = _ray_root()
        root.mkdir(parents=True, exist_ok=True)  # as ray.init makes it (and then opens it to every user)
        note = root / STARTING.format(pid=os.getpid())
        note.write_text(json.dumps(process_mark()), encoding="utf-8")
        return note
    except OSError:
        return None  # then a SIGKILL during ray.init() leaves the folder, as Ray does


def _adopt_unmarked(root: Path) -> None:
    """Give a session folder that a SIGKILLed run started while its `STARTING` note stood (named with
    its pid, dated from the note to 5 minutes after: not a later process given the same pid) the
    note's mark, as the run would have once ray.init() returned; reap_sessions then treats it as any
    other. The notes of processes that are gone go then."""
    from datetime import datetime

    for note in root.glob(STARTING.format(pid="*")):
        try:
            mark = json.loads(note.read_text(encoding="utf-8"))
            if not isinstance(mark, dict) or process_gone(mark) is not True:
                continue  # still starting, or not this machine's to judge
            for session in root.glob(f"session_*_{int(mark['pid'])}"):
                stamp = session.name[len("session_"):].rsplit("_", 1)[0]
                at = datetime.strptime(stamp, "%Y-%m-%d_%H-%M-%S_%f").timestamp()  # local time, as Ray writes it
                if (float(mark["marked_at"]) - 5 <= at <= float(mark["marked_at"]) + 300
                        and not session.is_symlink() and not (session / SESSION_MARK).exists()):
                    (session / SESSION_MARK).write_text(json.dumps(mark), encoding="utf-8")
            note.unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable, or a folder not of Ray's naming: left as it is


def _mark_session(session: Path) -> None:
    try:
        (session / SESSION_MARK).write_text(json.dumps(process_mark()), encoding="utf-8")
    except OSError:
        pass  # then a SIGKILL of this run leaves the folder, as Ray does


def reap_sessions(root: Path) -> list[Path]:
    """Remove the session folders under `root` (RAY_TMPDIR/ray...) that a run of ours left when it
    was SIGKILLed (no cleanup runs then: ~176 KB of logs and sockets each, for good): only those
    holding our marker (`SESSION_MARK`, or given it by `_adopt_unmarked`) whose process is gone on this machine, and that no live
    process names or holds open any more (its GCS and raylet die with the driver; measured, its
    dashboard and runtime-env agents lived on, orphaned, for 53 s to 3 min). A cluster someone started with
    `ray start`, another tool's, or one whose starter still runs is never touched."""
    removed = []
    if root.is_dir():
        _adopt_unmarked(root)
    for session in sorted(root.glob("session_*")) if root.is_dir() else ():
        try:
            mark = json.loads((session / SESSION_MARK).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours, or not ours to judge
        if session.is_symlink() or not isinstance(mark, dict) or process_gone(mark) is not True:
            continue
        if processes_using(str(session)):
            continue  # an orphaned agent of it still runs (a minute or more after the raylet's SIGKILL): a later run
        remove_session(session)
        removed.append(session)
    if removed:
        run_logger().info("Removed %d Ray session folder(s) that a killed run left: %s", len(removed),
                          ", ".join(p.name for p in removed))
    return removed


@contextmanager
def stops_kept():
    """A SIGTERM while scoring on Ray (kill, a cancel in Prefect, a stopped worker) ends the run as
    'stopped', as it does elsewhere, not 'failed (SystemExit: 1)', and a cancel ends it Cancelled.
    ray.init() puts its own SIGTERM handler (sys.exit) in place of the run's and ray.shutdown()
    leaves it there; but Prefect acknowledges a cancel only while its own handler is the one
    installed (else the run ends Crashed), so the run's stays: Ray's setter does nothing inside the
    block, and the function this yields puts the run's back, should another way have replaced it.
    What that handler raises inside Ray's waiting code comes out as a SystemError caused by it, and
    inside pydantic's serializer (prefect-ray's submit) as pydantic's own error, the cause lost; the
    run's exception is raised again from either (tasks/runs.py stop_reason reads it), the second
    known by the SIGTERM the run's block noted (tasks/run_ending.py stop_noted)."""
    from prefect.exceptions import TerminationSignal
    from ray._private import utils as ray_utils  # what ray.init() calls (ray pinned in constraints.txt)

    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield lambda: None
        return
    ours, setter = signal.getsignal(signal.SIGTERM), ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda _handler: None
    try:
        yield lambda: signal.signal(signal.SIGTERM, ours)
    except BaseException as err:
        came, seen = err.__cause__ or err.__context__, set()
        while came is not None and id(came) not in seen and not isinstance(err, (TerminationSignal, SystemExit)):
            if isinstance(came, TerminationSignal):
                raise TerminationSignal(signal=came.signal) from err
            if isinstance(came, SystemExit):  # the CLI's own handler (tasks/leftovers.py exit_on_termination)
                raise SystemExit(came.code) from err
            seen.add(id(came))
            came = came.__cause__ or came.__context__
        if not isinstance(err, (TerminationSignal, SystemExit)) and stop_noted():  # rewrapped without a cause
            raise TerminationSignal(signal=signal.SIGTERM) from err
        raise
    finally:
        ray_utils.set_sigterm_handler = setter
        signal.signal(signal.SIGTERM, ours)
