"""A run's own bookkeeping, as the flows call it: its process set up for the run, retention at its
start, at its end and after a failure, then its manifest and its `latest` pointer.

The Prefect tasks live here, over plain functions of storage.py and retention.py that stay free of
Prefect: `smolflow runs`, `compare` and `gc` import those alone and answer in ~0.5 s (Prefect's
import took another ~1.3 s of CPU on this project's 2-core machines, each time).
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import pointers, storage
from tasks.cache_limit import cache_root, mark_used, remove_entry
from tasks.caching import results_storage
from tasks.config import DeviceConfig, OutputConfig
from tasks.console import configure_logging
from tasks.device import Placement, publish, unpublish
from tasks.leftovers import own_temp_root, reap_orphaned_servers
from tasks.prefect_vacuum import vacuum_temporary_server_db
from tasks.prefect_markdown import publish_markdown
from tasks.retention import GcReport, gc
from tasks.runs import end_killed_flow_runs
from tasks.runtime import retry_transient, run_logger, run_timeout, set_torch_threads
from tasks.sandbox_paths import hide_from_sandbox

# storage.py's own functions (their docstrings say what they do) as tasks that retry a transient storage error.
write_manifest = task(storage.write_manifest, cache_policy=NO_CACHE, retries=3, retry_condition_fn=retry_transient,
                      retry_delay_seconds=[2, 10, 30])
set_latest = task(pointers.set_latest, cache_policy=NO_CACHE, retries=3, retry_condition_fn=retry_transient,
                  retry_delay_seconds=[2, 10, 30])


def begin_run(torch_threads: int | None, execution: DeviceConfig, artifacts_uri: str) -> tuple[int, Placement]:
    """The run's process set up as every flow starts (fine-tune, eval, arena): (the torch threads it
    runs on, where its models go). What a killed earlier run left goes first."""
    own_temp_root()  # this process's temporary files: a SIGKILLed run's go with the next start
    configure_logging()  # quiet unless SMOLFLOW_VERBOSE=1 (smolflow --verbose; a served run has no CLI in front)
    threads = set_torch_threads(torch_threads)
    placement = publish(execution)  # every model this run loads goes where this says (and Ray if asked)
    hide_from_sandbox(artifacts_uri)  # HumanEval's programs cannot read the runs
    reap_orphaned_servers()  # a temporary Prefect server that a SIGKILLed earlier run left behind
    vacuum_temporary_server_db()  # its flow-run vacuum never runs in a temporary server: months of nights stayed
    return threads, placement


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[5, 30])
def tidy_up(output: OutputConfig, run_id: str, in_use: list[str], started: float) -> GcReport:
    """End of a completed run, before its W&B run closes (a failure here closes it failed, as
    status.json says): apply retention, bound the cache (never what it used, nor its work dir)."""
    mark_used(list(in_use))
    report = gc(output.artifacts_uri, keep_runs=output.keep_runs, keep_incomplete_hours=output.keep_incomplete_hours,
                cache_max_gb=output.cache_max_gb, in_use=list(in_use), since=started, running=run_id)
    deleted = [d for d in report.decisions if d.action == "delete"]
    run_logger().info("Retention: freed %.1f MB (%d deleted); keep_runs=%d, cache_max_gb=%s",
                      report.freed_bytes / 1e6, len(deleted), output.keep_runs, output.cache_max_gb)
    publish_markdown("smolflow-retention", report.table(), description="Disk retention")
    return report


def tidy_before_run(output: OutputConfig, run_id: str) -> None:
    """Start of a run, before its first write: the same retention as at the end of one (never this
    run's own folder or work dir). Runs that end by SIGKILL (the OOM killer, a reboot, a supervisor's
    kill) run no hook, so without this a nightly killed every night left a run folder and a work dir
    of checkpoints a night, for good; and a disk filled by a failed night's checkpoints stayed full
    until keep_runs more nights had failed. Their Prefect flow runs, which said Running, end Crashed."""
    try:  # the cache's bound stays the run ends' business: here it would evict what this run is about to reuse
        report = gc(output.artifacts_uri, keep_runs=output.keep_runs, keep_incomplete_hours=output.keep_incomplete_hours,
                    cache_max_gb=None, running=run_id)
    except Exception as err:  # never the reason a run does not start
        run_logger().warning("Retention before the run did not run: %s: %s", type(err).__name__, err)
        return
    deleted = [d for d in report.decisions if d.action == "delete"]
    if deleted:
        run_logger().info("Retention before the run: freed %.1f MB (%d deleted)", report.freed_bytes / 1e6, len(deleted))
    try:
        if ended := end_killed_flow_runs(output.artifacts_uri, running=run_id):
            run_logger().info("Flow runs of killed runs set Crashed (they said Running): %s", ", ".join(ended))
    except Exception as err:  # the UI's record of old runs: never the reason a run does not start
        run_logger().warning("Flow runs of killed runs were not ended: %s: %s", type(err).__name__, err)


def drop_work_dir(run_id: str) -> None:
    """The very end of a completed run: its checkpoints are gone, its model and W&B files uploaded."""
    remove_entry(cache_root() / "work" / run_id)


def tidy_after_failure(flow, flow_run, state) -> None:
    """Flow hook on failure: retention as after a completed run (the run's own folder, work dir and
    what it used stay: all written since it started), so nights that keep failing stay bounded."""
    try:
        # The output section alone: a run whose parameters Prefect refused (a bad value typed in the
        # Run form) failed before it started, and retention needs no other section to be valid.
        output = OutputConfig.model_validate((flow_run.parameters.get("config") or {}).get("output") or {})
        since = flow_run.start_time.timestamp() if flow_run.start_time else time.time()
        report = gc(output.artifacts_uri, keep_runs=output.keep_runs, keep_incomplete_hours=output.keep_incomplete_hours,
                    cache_max_gb=output.cache_max_gb, since=since)
    except Exception as err:  # a hook never hides the run's own failure
        run_logger().warning("Retention after the failed run did not run: %s: %s", type(err).__name__, err)
        return
    deleted = [d for d in report.decisions if d.action == "delete"]
    run_logger().info("Retention after the failed run: freed %.1f MB (%d deleted)", report.freed_bytes / 1e6, len(deleted))



def run_flow_options() -> dict:
    """The flow options smolflow-finetune and smolflow-evaluate share: results under the cache bound,
    a time limit, and hooks ending the run's placement and bounding what a failed one leaves."""
    ended = [unpublish, tidy_after_failure]  # failed, crashed or stopped (SIGTERM, a cancel): bounded too
    return {"result_storage": results_storage(),  # under the cache bound: tasks/caching.py
            "timeout_seconds": run_timeout(),  # SMOLFLOW_RUN_TIMEOUT_HOURS: a hung run ends, its slot frees
            "on_completion": [unpublish],  # the run's device/precision/task-runner settings end with it
            "on_failure": ended, "on_crashed": ended, "on_cancellation": ended}
