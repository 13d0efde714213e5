"""Disk bounds: run retention on a local root and on real S3 (SeaweedFS), the LRU cache bound,
gc's dry run, and no needless model copy between run folders."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.cache_limit import plan_cache, usage
from tasks.models import fingerprint_dir, resolve_model
from tasks.pointers import read_pointer, set_pointer
from tasks.retention import WANDB_LOG_DAYS, apply_runs, gc, plan_runs, scan_runs, wandb_logs_dir
from tasks.storage import ArtifactStore, completed_runs, write_manifest
from tasks.training import publish_model
from tasks.transfer import place_dir

FLOW = "smolflow-finetune"


def _run(root: str, run_id: str, complete: bool = True) -> ArtifactStore:
    run = ArtifactStore(root).child("runs", run_id)
    run.write_json("config.json", {"run": run_id})
    run.write_bytes("model/model.safetensors", os.urandom(2048))
    if complete:
        write_manifest(run.uri, {"run_id": run_id})
    return run


@pytest.mark.parametrize("where", ["local", "s3"])
def test_retention_keeps_the_newest_and_every_pointer_and_recent_incomplete_runs(where, tmp_path, request):
    root = str(tmp_path / "artifacts") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/smolflow"
    # An incomplete run from before the newest completed one (a crash), then five completed runs,
    # then one still being written.
    _run(root, "r0-crashed", complete=False)
    for i in range(1, 6):
        _run(root, f"r{i}")
        if where == "s3":
            time.sleep(1.05)  # S3 times have 1 s resolution: completion order must be observable
    _run(root, "r9-running", complete=False)
    set_pointer(root, FLOW, "promoted", "r1")
    set_pointer(root, FLOW, "latest", "r5")

    plan = {d.name: d for d in plan_runs(root, keep_runs=2, keep_incomplete_hours=24)}
    assert {n for n, d in plan.items() if d.action == "delete"} == {"r2", "r3"}
    assert "pointer smolflow-finetune/promoted" in plan["r1"].reason
    assert "may still be running" in plan["r0-crashed"].reason  # written minutes ago: kept
    assert "may still be running" in plan["r9-running"].reason
    # A day later the crashed run goes; the one written after the newest completed run stays.
    later = {d.name: d for d in plan_runs(root, 2, 24, now=time.time() + 25 * 3600)}
    assert later["r0-crashed"].action == "delete" and later["r9-running"].action == "keep"
    assert "written after the newest completed run: resumable" in later["r9-running"].reason

    freed = apply_runs(list(plan.values()))
    assert freed == plan["r2"].bytes + plan["r3"].bytes > 0
    assert sorted(completed_runs(root)) == ["r1", "r4", "r5"]
    store = ArtifactStore(root)
    # Every object is gone (SeaweedFS may still list an empty folder name; S3 itself has no folders).
    assert store.list_files("runs/r2") in ([], ["."]) and store.list_files("runs/r3") in ([], ["."])
    assert {r.run_id for r in scan_runs(root)} == {"r0-crashed", "r1", "r4", "r5", "r9-running"}
    assert store.exists("runs/r0-crashed/config.json") and store.exists("runs/r9-running/config.json")
    assert read_pointer(root, FLOW, "promoted")["run_id"] == "r1" and store.exists("runs/r1/model/model.safetensors")


def test_nights_that_keep_failing_keep_only_keep_runs_incomplete_folders(tmp_path):
    """No run completes for a week (bad data, a dead endpoint): retention, which also runs after a
    failed run, keeps the newest keep_runs failed folders, not one more a night."""
    root = str(tmp_path / "artifacts")
    done = _run(root, "n0-done")
    for path in Path(done.uri).rglob("*"):  # the last run that completed, a week ago
        os.utime(path, (time.time() - 8 * 24 * 3600,) * 2)
    for night in range(1, 6):
        run = _run(root, f"n{night}-failed", complete=False)
        for path in Path(run.uri).rglob("*"):  # written a night apart, the newest a day ago
            os.utime(path, (time.time() - (7 - night) * 24 * 3600,) * 2)
    plan = {d.name: d for d in plan_runs(root, keep_runs=2, keep_incomplete_hours=12)}
    assert {n for n, d in plan.items() if d.action == "delete"} == {"n1-failed", "n2-failed", "n3-failed"}
    assert "number 3 from the newest incomplete: beyond output.keep_runs=2" in plan["n3-failed"].reason
    assert plan["n5-failed"].action == plan["n4-failed"].action == plan["n0-done"].action == "keep"
    # Within keep_incomplete_hours a folder may belong to a run still at work: never deleted.
    assert all(d.action == "keep" for d in plan_runs(root, keep_runs=2, keep_incomplete_hours=200))


def _entry(path: Path, size: int, when: float) -> Path:
    path.mkdir(parents=True)
    (path / "blob").write_bytes(bytes(size))
    for p in (path / "blob", path):
        os.utime(p, (when, when))
    return path


def test_cache_bound_evicts_least_recently_used_first_never_what_the_run_uses(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SMOLFLOW_CACHE", str(cache))
    now, mb = time.time(), 2**20
    old_model = _entry(cache / "models" / "old-model", mb, now - 50 * 3600)  # oldest, but this run uses it
    _entry(cache / "tokenized" / "a", mb, now - 40 * 3600)
    _entry(cache / "downloads" / "b", mb, now - 30 * 3600)
    _entry(cache / "datasets" / "c", mb, now - 20 * 3600)
    _entry(cache / "work" / "crashed-run", mb, now - 1 * 3600)  # a run may still be at work
    new = _entry(cache / "tokenized" / "made-this-run", mb, now)
    shared = tmp_path / "shared"  # a folder another cache owns, linked in: never ours to delete
    _entry(shared / "judgements-x", mb, now - 90 * 3600)
    (cache / "judgements").symlink_to(shared)
    one = usage(new)[0]

    plan = plan_cache(max_gb=2.5 * one / 1e9, in_use=[str(old_model / "blob")], since=now - 60)
    actions = {d.name: (d.action, d.reason) for d in plan}
    # 6 entries of one size, room for 2.5: evict a, then b, then c (least recently used first);
    # old-model (in use), made-this-run (since the run started) and the young work dir stay.
    assert [d.name for d in plan if d.action == "delete"] == ["tokenized/a", "downloads/b", "datasets/c"]
    assert actions["models/old-model"] == ("keep", "used by the current run")
    assert actions["tokenized/made-this-run"][1] == "used or written during the current run"
    assert "a run may still be using it" in actions["work/crashed-run"][1]
    assert not any(name.startswith("judgements") for name in actions)
    assert plan_cache(max_gb=None) and all(d.action == "keep" for d in plan_cache(max_gb=None))


def test_prefect_results_checks_and_win_rates_are_bounded_and_kept_ones_summed_up(tmp_path, monkeypatch):
    """Prefect's task results (tasks/caching.py) and the benchmark-check and win-rate records grow
    by a few a night: they are cache entries too, and the table sums up the kept ones by folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SMOLFLOW_CACHE", str(cache))
    now, mb = time.time(), 2**20
    for i, age_h in enumerate([300, 200, 100, 2, 1]):
        (cache / "results").mkdir(parents=True, exist_ok=True)
        (cache / "results" / f"key{i}").write_bytes(bytes(mb))
        os.utime(cache / "results" / f"key{i}", (now - age_h * 3600,) * 2)
    for name in ("checks/benchmark-gsm8k-0123.json", "win-rates/4567.json"):
        (cache / name).parent.mkdir(parents=True)
        (cache / name).write_text("{}")
    one = usage(cache / "results" / "key0")[0]

    report = gc(str(tmp_path / "artifacts"), cache_max_gb=3.5 * one / 1e9)
    assert [d.name for d in report.decisions if d.action == "delete"] == ["results/key0", "results/key1"]
    assert sorted(p.name for p in (cache / "results").iterdir()) == ["key2", "key3", "key4"]
    assert {d.name for d in report.decisions} >= {"checks/benchmark-gsm8k-0123.json", "win-rates/4567.json"}
    table = report.table()
    assert "| results/key0 | delete | cache |" in table and "| results/key1 | delete | cache |" in table
    assert "| results/ (3 entries) | keep | cache | 3.1 | within the cache bound |" in table
    assert "| checks/ (1 entry) | keep | cache |" in table and "results/key2" not in table


def _snapshot(*roots: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for r in roots for p in r.rglob("*") if p.is_file()}


def test_gc_dry_run_lists_but_deletes_nothing_then_gc_frees(tmp_path, monkeypatch):
    cache, root = tmp_path / "cache", str(tmp_path / "artifacts")
    monkeypatch.setenv("SMOLFLOW_CACHE", str(cache))
    for i in range(1, 5):
        _run(root, f"r{i}")
    set_pointer(root, FLOW, "latest", "r4")
    _entry(cache / "work" / "r1", 4096, time.time() - 25 * 3600)  # a completed run's leftover work dir
    # A completed run's fresh work dir: its W&B run may still be open (closed after the manifest).
    _entry(cache / "work" / "r3", 4096, time.time())
    _entry(cache / "tokenized" / "stale", 2**20, time.time() - 48 * 3600)
    before = _snapshot(Path(root), cache)

    report = gc(root, dry_run=True, keep_runs=2, cache_max_gb=0)
    assert _snapshot(Path(root), cache) == before  # nothing deleted, nothing touched
    deleted = {(d.kind, d.name) for d in report.decisions if d.action == "delete"}
    assert deleted == {("run", "r1"), ("run", "r2"), ("work", "work/r1"), ("cache", "tokenized/stale")}
    assert report.freed_bytes == sum(d.bytes for d in report.decisions if d.action == "delete") > 0
    assert "dry run: nothing deleted" in report.table() and "| r1 | delete | run |" in report.table()
    assert "| work/r3 | keep | cache |" in report.table() and "a run may still be using it" in report.table()

    done = gc(root, dry_run=False, keep_runs=2, cache_max_gb=0)
    assert {(d.kind, d.name) for d in done.decisions if d.action == "delete"} == deleted
    assert sorted(completed_runs(root)) == ["r3", "r4"]
    assert not (cache / "work" / "r1").exists() and not (cache / "tokenized" / "stale").exists()
    assert (cache / "work" / "r3").exists()


@pytest.mark.parametrize("value", ["-3", "nan", "inf", "twenty"])
def test_gc_refuses_a_cache_bound_that_is_not_a_size(value, tmp_path, monkeypatch):
    # -3 or nan passed and would have evicted everything in the cache; refused before any decision
    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SMOLFLOW_CACHE_MAX_GB", value)
    _entry(tmp_path / "cache" / "tokenized" / "kept", 4096, time.time() - 48 * 3600)
    with pytest.raises(ValueError, match=rf"SMOLFLOW_CACHE_MAX_GB='{value}' is not a number of GB; set e.g. 20"):
        gc(str(tmp_path / "artifacts"), dry_run=False, keep_runs=2, cache_max_gb="env")
    assert (tmp_path / "cache" / "tokenized" / "kept").exists()
    monkeypatch.setenv("SMOLFLOW_CACHE_MAX_GB", "none")  # unbounded: said so, kept
    gc(str(tmp_path / "artifacts"), dry_run=False, keep_runs=2, cache_max_gb="env")
    assert (tmp_path / "cache" / "tokenized" / "kept").exists()


def test_a_model_hard_linked_between_runs_is_freed_once_and_only_with_its_last_link(tmp_path, monkeypatch):
    """Cached re-runs hard-link one model into each run folder: deleting those runs frees it once,
    and not at all while a kept run (or any other folder) still links it."""
    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    root = str(tmp_path / "artifacts")
    runs = [_run(root, f"r{i}") for i in range(1, 5)]
    model = Path(runs[0].root) / "model" / "model.safetensors"
    model.write_bytes(os.urandom(2**20))
    for run in runs[1:3]:  # r2 and r3 reuse r1's model; r4 trained its own
        (Path(run.root) / "model" / "model.safetensors").unlink()
        os.link(model, Path(run.root) / "model" / "model.safetensors")
    for i, run in enumerate(runs):  # completion order r1..r4
        os.utime(Path(run.root) / "manifest.json", (time.time() - (4 - i) * 3600,) * 2)
    own = sum(p.stat().st_size for p in Path(runs[0].root).rglob("*") if p.is_file()) - 2**20

    def freed(keep_runs):
        return {d.name: d.bytes for d in gc(root, dry_run=True, keep_runs=keep_runs).decisions
                if d.kind == "run" and d.action == "delete"}

    # keep r4, r3: r3 still links the model, so deleting r1 and r2 frees only their own files
    assert freed(2) == {"r1": own, "r2": own}
    # keep r4 only: r1-r3 go, and the model's blocks are freed once, with the first of them
    three = freed(1)
    assert sorted(three.values()) == [own, own, own + 2**20]
    report = gc(root, dry_run=True, keep_runs=1)
    assert report.freed_bytes == sum(three.values()) + sum(d.bytes for d in report.decisions
                                                           if d.kind != "run" and d.action == "delete")
    os.link(model, tmp_path / "elsewhere.safetensors")  # another link outside the runs: freed by none
    assert sorted(freed(1).values()) == [own, own, own]


@pytest.mark.parametrize("variable", ["WANDB_CACHE_DIR", "XDG_CACHE_HOME"])
def test_old_wandb_service_logs_go_and_recent_ones_stay(variable, tmp_path, monkeypatch):
    """wandb-core writes debug logs (core-debug-*, symon-debug-*) for every W&B run into a folder
    it picks and never deletes them: gc finds that folder as wandb-core does and drops those older
    than WANDB_LOG_DAYS, nothing else there."""
    monkeypatch.delenv("WANDB_CACHE_DIR", raising=False)
    monkeypatch.setenv(variable, str(tmp_path / "wbcache"))
    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    run = ("import wandb; r = wandb.init(project='p', mode='offline', dir=%r); r.log({'a': 1}); r.finish()"
           % str(tmp_path))
    # Without WANDB_SERVICE: a W&B run earlier in this test process set it, and the child would
    # join that process's service (whose logs are elsewhere) instead of starting its own.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    subprocess.run([sys.executable, "-c", run], check=True, env=env, timeout=120)
    logs = wandb_logs_dir()
    written = sorted(p.name for p in logs.glob("core-debug-*.log"))
    assert len(written) == 1, f"a real W&B run's service log is not where gc looks ({logs})"

    now = time.time()
    old = {"core-debug-20260101_000000.log": WANDB_LOG_DAYS + 1, "symon-debug-20260101_000001.log": WANDB_LOG_DAYS + 30}
    for name, age_days in [*old.items(), ("core-debug-20261201_000000.log", WANDB_LOG_DAYS - 1),
                           ("notes.log", 400), ("core-debug-keep.log", 400)]:
        (logs / name).write_text("x" * 1000)
        os.utime(logs / name, (now - age_days * 86400,) * 2)

    assert gc(str(tmp_path / "artifacts"), dry_run=True).freed_bytes == 2000
    assert set(old) <= {p.name for p in logs.iterdir()}  # a dry run deletes nothing
    report = gc(str(tmp_path / "artifacts"))
    assert sorted(d.name for d in report.decisions if d.action == "delete") == sorted(old)
    assert not any((logs / name).exists() for name in old)
    assert {"core-debug-20261201_000000.log", "notes.log", "core-debug-keep.log", *written} <= {
        p.name for p in logs.iterdir()}
    table = report.table()
    assert f"| {logs}/ (2 entries) | delete | log | 0.0 | W&B service debug log older than 14 days |" in table


def test_publishing_a_cached_model_links_it_and_survives_its_first_run_being_deleted(tiny_model_dir, tmp_path):
    root = str(tmp_path / "artifacts")
    ref = publish_model.fn(resolve_model.fn(str(tiny_model_dir)), f"{root}/runs/r1")
    write_manifest(f"{root}/runs/r1", {"run_id": "r1", "tuned_model": ref.model_dump()})
    # A cached training result points at r1's model: r2 gets hard links, not a second copy.
    second = publish_model.fn(ref, f"{root}/runs/r2")
    weights = "model.safetensors"
    assert os.stat(Path(second.path, weights)).st_ino == os.stat(Path(ref.path, weights)).st_ino
    assert fingerprint_dir(Path(second.path)) == ref.fingerprint
    write_manifest(f"{root}/runs/r2", {"run_id": "r2", "tuned_model": second.model_dump()})
    set_pointer(root, FLOW, "latest", "r2")
    apply_runs([d for d in plan_runs(root, keep_runs=1, keep_incomplete_hours=24) if d.name == "r1"])
    assert not Path(ref.path).exists() and Path(second.path, weights).is_file()  # the link outlived r1
    # The cache still points at r1's (deleted) folder: the copy in r2 is found by fingerprint.
    third = publish_model.fn(ref, f"{root}/runs/r3")
    assert fingerprint_dir(Path(third.path)) == ref.fingerprint
    assert os.stat(Path(third.path, weights)).st_ino == os.stat(Path(second.path, weights)).st_ino


def test_publishing_on_s3_copies_server_side(tiny_model_dir, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    root = f"{s3_bucket}/smolflow"
    first = publish_model.fn(resolve_model.fn(str(tiny_model_dir)), f"{root}/runs/r1")
    uri, how = place_dir(first.path, ArtifactStore(root).child("runs", "r2"), "model")
    files = ArtifactStore(first.path).list_files()
    assert how == {"server-copy": len(files)}  # S3 CopyObject per file: nothing went through this machine
    assert not (tmp_path / "cache" / "downloads").exists()
    copy = ArtifactStore(uri)
    assert copy.list_files() == files
    assert all(copy.sha256(f) == ArtifactStore(first.path).sha256(f) for f in files)


def test_a_failed_runs_folder_is_kept_for_a_rerun_and_said_so(tmp_path):
    # Its status.json says failed: "may still be running" (what gc said of it) was wrong.
    root = str(tmp_path / "artifacts")
    _run(root, "crashed", complete=False)
    _run(root, "failed", complete=False).write_json("status.json", {"state": "failed", "why": "ValueError: x"})
    plan = {d.name: d for d in plan_runs(root, keep_runs=2, keep_incomplete_hours=24)}
    assert plan["failed"].action == "keep" and plan["failed"].reason.startswith("failed, last written")
    assert "kept for a re-run with its run_id" in plan["failed"].reason
    assert plan["crashed"].reason.startswith("incomplete,") and "may still be running" in plan["crashed"].reason


def test_only_the_newest_failed_run_keeps_its_checkpoints(tmp_path, monkeypatch):
    """A night that failed on a full disk kept its checkpoints (GBs) among keep_runs kept failures,
    and every later night failed on the same full disk until keep_runs nights had passed. Of the
    failed or stopped runs, the newest keeps its checkpoints (the one to resume); older ones keep
    their folder (status, logs, W&B files) without them. A run still at work keeps everything."""
    from tasks.leftovers import process_mark

    cache, root = tmp_path / "cache", str(tmp_path / "artifacts")
    monkeypatch.setenv("SMOLFLOW_CACHE", str(cache))
    for age_h, run_id, state in ((3, "night1", "failed"), (2, "night2", "stopped"), (1, "night3", "failed"),
                                 (0, "night4", "running")):
        run = _run(root, run_id, complete=False)
        status = {"state": state, "why": "OSError: [Errno 28] No space left on device"}
        run.write_json("status.json", status | (process_mark() if state == "running" else {}))
        work = cache / "work" / run_id / "checkpoints" / "checkpoint-6"
        work.mkdir(parents=True)
        (work / "optimizer.pt").write_bytes(os.urandom(64 * 1024))
        (work / "COMPLETE").write_text("{}")
        place_dir(str(work), run.child("checkpoints"), "checkpoint-6")  # as the uploader: hard links
        for path in [*Path(run.uri).rglob("*"), *work.rglob("*")]:
            os.utime(path, (time.time() - age_h * 3600,) * 2)
    report = gc(root, dry_run=True, keep_runs=14, keep_incomplete_hours=24, cache_max_gb=None)
    trimmed = {d.name: d for d in report.decisions if d.kind == "checkpoints"}
    assert set(trimmed) == {"night1/checkpoints", "night2/checkpoints"}, report.table()
    assert all(d.action == "delete" and "(night3) is the one to resume" in d.reason for d in trimmed.values())
    # Hard links count once: the run folder's and the work dir's copies are the same 64 KiB file.
    assert 64 * 1024 <= trimmed["night1/checkpoints"].bytes < 2 * 64 * 1024
    assert "| night1/checkpoints | delete | checkpoints |" in report.table()
    assert (Path(root) / "runs/night1/checkpoints/checkpoint-6/COMPLETE").is_file()  # a dry run deletes nothing

    done = gc(root, keep_runs=14, keep_incomplete_hours=24, cache_max_gb=None)
    # The dry run said what the real one did: the work dirs' checkpoints that it removes counted in the
    # cache's rows too before (work/night1 shown with its 64 KiB checkpoint, which the real run deletes).
    assert ({d.name: d.bytes for d in report.decisions if d.kind == "cache"}
            == {d.name: d.bytes for d in done.decisions if d.kind == "cache"}), report.table() + done.table()
    assert {d.name: d.bytes for d in report.decisions if d.kind == "cache"}["work/night1"] < 64 * 1024
    for run_id in ("night1", "night2"):
        assert not (Path(root) / "runs" / run_id / "checkpoints").exists()
        assert not (cache / "work" / run_id / "checkpoints").exists()
        assert (Path(root) / "runs" / run_id / "status.json").is_file()  # the folder itself stays
    for run_id in ("night3", "night4"):
        assert (Path(root) / "runs" / run_id / "checkpoints/checkpoint-6/COMPLETE").is_file()
        assert (cache / "work" / run_id / "checkpoints/checkpoint-6/optimizer.pt").is_file()


def test_a_failed_runs_work_dir_goes_with_its_folder_though_gc_followed_its_links(tmp_path, monkeypatch):
    """W&B leaves symlinks in a run's work dir (debug.log, latest-run, ...). Following one (gc's own
    scan did) sets the link's atime to now, and the cache bound read it as the work dir's last use:
    a failed run's work dir, checkpoints and all, looked "written 0.0 h ago" at every pass, so
    retention deleted the run folder, kept the work dir, and no later pass knew whose it was."""
    cache, root = tmp_path / "cache", str(tmp_path / "artifacts")
    monkeypatch.setenv("SMOLFLOW_CACHE", str(cache))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    failed = _run(root, "n1-failed", complete=False)
    failed.write_json("status.json", {"state": "failed", "why": "OSError: [Errno 28] No space left on device"})
    work = cache / "work" / "n1-failed"
    (work / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (work / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(os.urandom(64 * 1024))
    log = tmp_path / "wandb-cache" / "core-debug-20261201_000000.log"
    log.parent.mkdir(parents=True)
    log.write_text("log")
    (work / "wandb").mkdir()
    (work / "wandb" / "debug-core.log").symlink_to(log)
    three_days = time.time() - 3 * 24 * 3600
    for path in [*Path(failed.uri).rglob("*"), Path(failed.uri), *work.rglob("*"), work, log]:
        os.utime(path, (three_days, three_days), follow_symlinks=False)
    done = _run(root, "n2-done")  # a later night completed: the failed one is not to be resumed
    for path in [*Path(done.uri).rglob("*"), Path(done.uri)]:
        os.utime(path, (time.time() - 2 * 24 * 3600,) * 2)

    first = gc(root, dry_run=True, keep_runs=14, keep_incomplete_hours=24, cache_max_gb=None)  # follows the link
    assert {d.name: d.action for d in first.decisions if d.kind in ("run", "work")} == {
        "n1-failed": "delete", "n2-done": "keep", "work/n1-failed": "delete"}, first.table()
    report = gc(root, keep_runs=14, keep_incomplete_hours=24, cache_max_gb=None)
    assert not (Path(root) / "runs" / "n1-failed").exists()
    assert not work.exists(), report.table()  # its checkpoints with it: nothing left that no run owns


def test_a_newer_failed_run_without_checkpoints_still_frees_the_older_ones(tmp_path, monkeypatch):
    """The disk filled: night1 failed with two checkpoints; night2 failed on the same full disk while
    saving its first (a partial checkpoint in its work dir, none in its run folder). night2 is the
    newest failed run, so night1's checkpoints go; they stayed, being the newest *with* checkpoints
    in the run folder, and night3 failed on them again (three nights until keep_runs let go)."""
    cache, root = tmp_path / "cache", str(tmp_path / "artifacts")
    monkeypatch.setenv("SMOLFLOW_CACHE", str(cache))
    for age_h, run_id, saved in ((25, "night1", True), (1, "night2", False)):
        run = _run(root, run_id, complete=False)
        run.write_json("status.json", {"state": "failed", "why": "OSError: [Errno 28] No space left on device"})
        work = cache / "work" / run_id / "checkpoints" / "checkpoint-2"
        work.mkdir(parents=True)
        (work / "optimizer.pt").write_bytes(os.urandom(64 * 1024))  # night2's: cut off, no marker
        if saved:
            (work / "COMPLETE").write_text("{}")
            place_dir(str(work), run.child("checkpoints"), "checkpoint-2")
        for path in [*Path(run.uri).rglob("*"), *work.parents[1].rglob("*")]:
            os.utime(path, (time.time() - age_h * 3600,) * 2)
    report = gc(root, keep_runs=14, keep_incomplete_hours=24, cache_max_gb=None)
    trimmed = {d.name: d for d in report.decisions if d.kind == "checkpoints"}
    assert set(trimmed) == {"night1/checkpoints"}, report.table()
    assert "(night2) is the one to resume" in trimmed["night1/checkpoints"].reason
    assert not (Path(root) / "runs/night1/checkpoints").exists() and not (cache / "work/night1/checkpoints").exists()
    assert (Path(root) / "runs/night1/status.json").is_file()  # the folder itself stays
    assert (cache / "work/night2/checkpoints/checkpoint-2/optimizer.pt").is_file()  # the newest keeps its own


def test_a_new_run_frees_the_checkpoints_of_a_night_that_failed_on_a_full_disk(tmp_path, monkeypatch):
    """On a disk that fits one run, the newest failed night's checkpoints (kept to resume) were the
    room the next night needed, and nights alternated failures. When that night failed on a full
    disk, a new run starting takes them; a re-run of that night's own id keeps them to resume."""
    from tasks.retention import plan_runs

    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    for run_id, why in (("full", "OSError: [Errno 28] No space left on device (0.9 MB free there; ...)"),
                        ("broken", "ValueError: no such column 'messages'")):
        base = tmp_path / run_id
        run = _run(str(base), run_id, complete=False)
        run.write_json("status.json", {"state": "failed", "why": why})
        run.write_bytes("checkpoints/checkpoint-4/optimizer.pt", os.urandom(4096))
        run.write_text("checkpoints/checkpoint-4/COMPLETE", "{}")
        trimmed = {d.name for d in plan_runs(str(base), 14, 24, running="20261206-020000-next") if d.kind == "checkpoints"}
        assert trimmed == ({"full/checkpoints"} if run_id == "full" else set()), (run_id, trimmed)
        # Its own re-run resumes from them; the failed run's own hook (no run starting) keeps them too.
        assert not [d for d in plan_runs(str(base), 14, 24, running=run_id) if d.kind == "checkpoints"]
        assert not [d for d in plan_runs(str(base), 14, 24) if d.kind == "checkpoints"]
