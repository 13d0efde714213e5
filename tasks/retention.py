"""Disk bounds for unattended runs: run-folder retention on the artifact root (local or S3).

Rules (docs/operations.md, "Disk"):
- Completed runs (with manifest.json), newest completion first: the first `keep_runs` stay; every
  run a pointer names (`pointers/<flow>/latest.json`, `promoted.json`, any flow) stays whatever
  its age; the rest are deleted.
- Incomplete runs (no manifest: failed, stopped, crashed, or still being written) are deleted only
  when nothing in them was written for `keep_incomplete_hours` (a run still at work writes its
  config, previews, checkpoints, status and benchmark files as it goes) and either their newest
  object is older than the newest completed run's manifest (a later run has finished since, so
  nobody is about to resume them) or `keep_runs` newer incomplete runs exist (every night failing
  must not fill the disk either). Otherwise they stay, and the newest failed or stopped one keeps
  its resumable checkpoints; older ones lose theirs (a disk filled by a failed night's checkpoints
  stayed full for keep_runs nights). Retention runs at the start and end of every run and after a
  failed one (tasks/bookkeeping.py).
- A run is deleted manifest first: readers (completed_runs, pointers) ignore a run without one, so
  a half-deleted run never looks complete.
- W&B's service (wandb-core) writes two debug logs per W&B run (`core-debug-*.log`,
  `symon-debug-*.log`) into a folder of its own choosing and never deletes one: those older than
  `WANDB_LOG_DAYS` go too (`plan_wandb_logs`).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from tasks.cache_limit import HOUR, Decision, apply_cache, cache_root, default_max_gb, plan_cache, usage
from tasks.runs import run_status
from tasks.runtime import run_logger
from tasks.storage import ArtifactStore


def _when(info: dict[str, Any]) -> float:
    """Modification time (epoch seconds) from an fsspec info dict: local `mtime`, S3 `LastModified`."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


class RunInfo(BaseModel):
    run_id: str
    uri: str
    bytes: int
    files: int
    last_write: float  # newest object's modification time
    completed_at: float | None  # manifest.json's modification time; None: incomplete
    checkpoint_bytes: int = 0  # under checkpoints/: resumable training state, GBs on a real model
    links: dict[int, tuple[int, int]] = {}  # local files with other hard links: inode -> (size, link count)


def scan_runs(root: str) -> list[RunInfo]:
    """Every folder under <root>/runs/ with its size, newest write and completion time (one listing)."""
    store = ArtifactStore(root)
    base = store._path("runs").rstrip("/")
    if not store.exists("runs"):
        return []
    runs: dict[str, dict[str, Any]] = {}
    for path, info in store.fs.find(base, detail=True).items():
        rel = posixpath.relpath(path, base)
        run_id, _, inside = rel.partition("/")
        if not inside:
            continue  # a stray file directly under runs/
        r = runs.setdefault(run_id, {"bytes": 0, "files": 0, "last_write": 0.0, "completed_at": None, "links": {},
                                     "checkpoint_bytes": 0})
        when = _when(info)
        r["bytes"] += int(info.get("size") or 0)
        if inside.startswith("checkpoints/"):
            r["checkpoint_bytes"] += int(info.get("size") or 0)
        if (info.get("nlink") or 1) > 1 and info.get("ino"):  # a cached model is hard-linked between runs
            r["links"][int(info["ino"])] = (int(info.get("size") or 0), int(info["nlink"]))
        r["files"] += 1
        r["last_write"] = max(r["last_write"], when)
        if inside == "manifest.json":
            r["completed_at"] = when
    return [RunInfo(run_id=k, uri=store.child("runs", k).uri, **v) for k, v in sorted(runs.items())]


def pinned_runs(root: str) -> dict[str, list[str]]:
    """{run_id: ["<flow>/latest", ...]} for every pointer under <root>/pointers/ (all flows)."""
    store = ArtifactStore(root)
    pinned: dict[str, list[str]] = {}
    for rel in store.glob("pointers/*/*.json"):
        try:
            pointer = store.read_json(rel)
        except (FileNotFoundError, ValueError):
            continue  # replaced or half-visible between the listing and the read: the next pass sees it
        flow, name = rel.split("/")[1], posixpath.splitext(rel.split("/")[2])[0]
        pinned.setdefault(str(pointer.get("run_id")), []).append(f"{flow}/{name}")
    return pinned


def _ended(root: str, run_id: str) -> str | None:
    """'failed' or 'stopped' when an incomplete run ended so (its status.json says, or its process
    is gone: tasks/runs.py run_status), else None."""
    try:
        state = run_status(ArtifactStore(root).child("runs", run_id))["state"]
    except (FileNotFoundError, ValueError):
        return None
    return state if state in ("failed", "stopped") else None


def plan_runs(root: str, keep_runs: int, keep_incomplete_hours: float, now: float | None = None,
              running: str | None = None, said: dict[str, str] | None = None) -> list[Decision]:
    """Which run folders under root to keep or delete, and why (nothing is deleted here); `running`:
    the calling run's id, never deleted (a re-run of an old failed run id resumes its checkpoints);
    `said`: how the reasons name each setting (`smolflow gc`: the flag, or whose setting it is)."""
    now = time.time() if now is None else now
    said = {"keep_runs": f"output.keep_runs={keep_runs}",
            "keep_incomplete_hours": f"output.keep_incomplete_hours={keep_incomplete_hours:g}"} | (said or {})
    keep, hours = said["keep_runs"], said["keep_incomplete_hours"]
    runs, pinned = scan_runs(root), pinned_runs(root)
    if running:
        pinned.setdefault(running, []).append("the run being started (output.run_id)")
    # Newest completion first; S3 times have 1 s resolution, so ties go by run id (time-stamped by default).
    complete = sorted((r for r in runs if r.completed_at is not None), key=lambda r: (r.completed_at, r.run_id),
                      reverse=True)
    newest_done = complete[0].completed_at if complete else None
    out = []
    for rank, r in enumerate(complete, start=1):
        if r.run_id in pinned:
            action, why = "keep", f"named by pointer {', '.join(pinned[r.run_id])}"
        elif rank <= keep_runs:
            action, why = "keep", f"completed, {rank} of the {keep_runs} newest ({keep})"
        else:
            action, why = "delete", f"completed, number {rank} from the newest: beyond {keep}"
        out.append(Decision(kind="run", name=r.run_id, where=r.uri, bytes=r.bytes, action=action, reason=why,
                            complete=True))
    # Newest write first: when every night fails (bad data, a dead endpoint), the failed runs are
    # bounded by keep_runs too, not only once a run completes again.
    incomplete = sorted((r for r in runs if r.completed_at is None), key=lambda r: (r.last_write, r.run_id),
                        reverse=True)
    ended_kept: list[RunInfo] = []  # failed or stopped, kept, with checkpoints: newest first
    for rank, r in enumerate(incomplete, start=1):
        idle_h = (now - r.last_write) / HOUR
        untouched = f"untouched for {idle_h:.1f} h (>= {hours})"
        if r.run_id in pinned:
            action, why = "keep", f"named by pointer {', '.join(pinned[r.run_id])}"
        elif idle_h < keep_incomplete_hours:
            ended = _ended(root, r.run_id)  # failed or stopped: said so, not "may still be running"
            action, why = "keep", (f"{ended or 'incomplete'}, last written {idle_h:.1f} h ago (< "
                                   f"{hours}): "
                                   + ("kept for a re-run with its run_id" if ended else "may still be running"))
        elif newest_done is not None and r.last_write < newest_done:
            action, why = "delete", f"incomplete, older than the newest completed run and {untouched}"
        elif rank > keep_runs:
            action, why = "delete", f"incomplete, number {rank} from the newest incomplete: beyond {keep} and {untouched}"
        else:
            action, why = "keep", (f"incomplete, {rank} of the {keep_runs} newest incomplete runs ({keep}), written "
                                   "after the newest completed run: resumable")
        out.append(Decision(kind="run", name=r.run_id, where=r.uri, bytes=r.bytes, action=action, reason=why,
                            complete=False))
        if action == "keep" and r.run_id not in pinned and _ended(root, r.run_id):
            ended_kept.append(r)
    # Of the kept runs that failed or stopped, only the newest keeps its checkpoints: it is the one to
    # resume. A night that failed on a full disk left its checkpoints among keep_runs kept failures,
    # and every later night failed on the same full disk until keep_runs nights had passed. The newest
    # is the newest that ended, with checkpoints or not: a night that failed on that full disk before
    # its first checkpoint reached the run folder left the older night's GBs in place, and the next
    # night failed on them again. Checkpoints only in the work dir (a save cut off) go too.
    why = {r.run_id: f"a newer failed or stopped run ({ended_kept[0].run_id}) is the one to resume: the folder "
                      "stays, its checkpoints go (a re-run of this id starts at step 0)" for r in ended_kept[1:]}
    # A new run starting after a night that failed on a full disk: that night's checkpoints hold the
    # room the new run needs (on a disk that fits one run, nights alternated failures), and only a
    # re-run of that night's id would use them.
    if ended_kept and running and running != ended_kept[0].run_id and _failed_on_full_disk(root, ended_kept[0].run_id):
        why[ended_kept[0].run_id] = (f"it failed on a full disk, and the run starting now ({running}) needs the room: "
                                     "the folder stays, its checkpoints go (a re-run of this id starts at step 0)")
    for r in ended_kept:
        if r.run_id not in why or not (r.checkpoint_bytes or _work_checkpoints(r.run_id).is_dir()):
            continue
        out.append(Decision(kind="checkpoints", name=f"{r.run_id}/checkpoints", where=r.uri,
                            bytes=r.checkpoint_bytes + _work_only_bytes(r), action="delete", reason=why[r.run_id]))
    return _count_shared_once(out, runs)


def _failed_on_full_disk(root: str, run_id: str) -> bool:
    """Whether a run's status says it failed on a full disk (ENOSPC, EDQUOT: tasks/runtime.py disk_full)."""
    try:
        said = str(run_status(ArtifactStore(root).child("runs", run_id)).get("why") or "").lower()
    except (FileNotFoundError, ValueError):
        return False
    return any(words in said for words in ("no space left on device", "disk quota exceeded"))


def _work_checkpoints(run_id: str) -> Path:
    return cache_root() / "work" / run_id / "checkpoints"


def _files(folders) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file under the folders that exist."""
    return {(st.st_dev, st.st_ino) for folder in folders if folder.is_dir() and not folder.is_symlink()
            for st in (p.lstat() for p in folder.rglob("*")) if stat.S_ISREG(st.st_mode)}


def _work_only_bytes(r: RunInfo) -> int:
    """Bytes of the work dir's checkpoints that the run folder's do not share (hard links count once)."""
    folder = _work_checkpoints(r.run_id)
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return sum(st.st_blocks * 512 for st in map(Path.lstat, files) if st.st_ino not in r.links)


def _count_shared_once(decisions: list[Decision], runs: list[RunInfo]) -> list[Decision]:
    """A deleted run frees only the blocks nothing else holds: a file hard-linked into a kept run,
    into the cache or another folder (more links than the runs hold), or already counted for
    another deleted run, frees nothing (else three runs sharing one 543 MB model 'free' 1.6 GB)."""
    by_id = {r.run_id: r for r in runs}
    held = Counter(ino for r in runs for ino in r.links)
    kept = {ino for d in decisions if d.kind == "run" and d.action == "keep" for ino in by_id[d.name].links}
    counted: set[int] = set()
    out = []
    for d in decisions:
        shared = 0
        if d.kind == "run" and d.action == "delete":  # (checkpoints: both of their links go, see plan_runs)
            for ino, (size, nlink) in by_id[d.name].links.items():
                if ino in kept or ino in counted or nlink > held[ino]:
                    shared += size
                else:
                    counted.add(ino)
        if shared:
            d = d.model_copy(update={"bytes": d.bytes - shared, "reason": f"{d.reason} ({shared / 1e6:.1f} MB of it "
                                     "hard-linked elsewhere: freed with its last link)"})
        out.append(d)
    return out


def delete_run(uri: str) -> None:
    """Remove a run folder, its manifest first so that readers stop seeing it as complete at once."""
    run = ArtifactStore(uri)
    if run.exists("manifest.json"):
        run.fs.rm(run._path("manifest.json"))
    if run.exists():
        run.fs.rm(run.root, recursive=True)


def apply_runs(decisions: list[Decision], dry_run: bool = False) -> int:
    """Delete the runs marked delete (unless dry_run); returns the bytes freed (or to be freed)."""
    freed, log = 0, run_logger()
    for d in decisions:
        if d.kind == "run" and d.action == "delete":
            if not dry_run:
                delete_run(d.where)
            log.info("%s run %s (%.1f MB): %s", "Would delete" if dry_run else "Deleted", d.name, d.bytes / 1e6,
                     d.reason)
            freed += d.bytes
        elif d.kind == "checkpoints" and d.action == "delete":
            if not dry_run:
                from tasks.checkpoints import remove_checkpoints  # here: it imports Prefect (tasks/bookkeeping.py)

                remove_checkpoints(ArtifactStore(d.where), _work_checkpoints(d.name.split("/")[0]).parent)
            log.info("%s %s (%.1f MB): %s", "Would delete" if dry_run else "Deleted", d.name, d.bytes / 1e6, d.reason)
            freed += d.bytes
    return freed


WANDB_LOG_DAYS = 14.0
_WANDB_LOG = re.compile(r"(core|symon)-debug-\d{8}_\d{6}\.log$")


def wandb_logs_dir() -> Path:
    """The folder wandb-core (0.31) writes its debug logs to: $WANDB_CACHE_DIR/wandb/logs, else
    $XDG_CACHE_HOME/wandb/logs, else ~/.cache/wandb/logs (tests/test_retention.py checks a real run's)."""
    base = os.environ.get("WANDB_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wandb" / "logs"


def plan_wandb_logs(keep_days: float = WANDB_LOG_DAYS, now: float | None = None) -> list[Decision]:
    """wandb-core's debug logs (two a W&B run, a few KB, kept forever by W&B) older than keep_days:
    delete; newer ones (a run's problem is looked at within days) and every other file there: keep."""
    now, folder = time.time() if now is None else now, wandb_logs_dir()
    out = []
    for f in sorted(folder.glob("*-debug-*.log")) if folder.is_dir() else []:
        if not _WANDB_LOG.match(f.name) or not f.is_file():
            continue
        st = f.stat()
        old = now - st.st_mtime > keep_days * 24 * HOUR
        why = (f"W&B service debug log older than {keep_days:g} days" if old
               else f"W&B service debug log, written within {keep_days:g} days")
        out.append(Decision(kind="log", name=f.name, where=str(f), bytes=st.st_size, action="delete" if old else "keep",
                            reason=why))
    return out


def apply_logs(decisions: list[Decision], dry_run: bool = False) -> int:
    """Delete the logs marked delete (unless dry_run); returns the bytes freed (or to be freed)."""
    freed = 0
    for d in decisions:
        if d.kind == "log" and d.action == "delete":
            if not dry_run:
                Path(d.where).unlink(missing_ok=True)
            freed += d.bytes
    return freed


# ---- gc: runs + cache in one report; the end-of-run step -------------------------------------


class GcReport(BaseModel):
    """Everything gc looked at: each run folder and cache entry, kept or deleted, and why."""

    root: str
    cache: str
    dry_run: bool
    decisions: list[Decision]
    freed_bytes: int

    def table(self) -> str:
        """Each run folder, work dir and deleted cache entry on its own row; other kept cache entries
        one row per folder and reason (a month of nightlies keeps thousands of small results and
        verdicts); W&B's debug logs one row per action."""
        verb = "would free" if self.dry_run else "freed"
        rows, grouped = [], {}
        for d in self.decisions:
            if d.kind == "log" or (d.kind == "cache" and d.action == "keep" and not d.name.startswith("work/")):
                folder = str(Path(d.where).parent) if d.kind == "log" else d.name.split("/")[0]
                group = grouped.setdefault((d.action, d.kind, folder, d.reason), [0, 0])
                group[0], group[1] = group[0] + 1, group[1] + d.bytes
            else:
                rows.append((d.action != "delete", d.kind, d.name, d.bytes, d.reason))
        rows += [(action != "delete", kind, f"{folder}/ ({n} {'entry' if n == 1 else 'entries'})", size, why)
                 for (action, kind, folder, why), (n, size) in grouped.items()]
        # The name first: where the UI narrows the table, the first column labels each row.
        rows = "".join(f"| {name} | {'keep' if kept else 'delete'} | {kind} | {size / 1e6:.1f} | {why} |\n"
                       for kept, kind, name, size, why in sorted(rows))
        return (f"gc of {self.root} and cache {self.cache}: {verb} {self.freed_bytes / 1e6:.1f} MB"
                f"{' (dry run: nothing deleted)' if self.dry_run else ''}\n\n"
                f"| name | action | kind | MB | why |\n|---|---|---|---|---|\n{rows}")


def plan_work_dirs(root: str, cache_root, done: set[str], keep: set[str] = frozenset(),
                   running_hours: float = 24.0, now: float | None = None) -> list[Decision]:
    """work/<run_id> folders of runs under root that completed (the run folder holds everything) or
    are being deleted, untouched for `running_hours`: a run writes its manifest before its W&B run
    (in its work dir) closes, and another run's gc or `smolflow gc` may come in between. `keep`:
    the calling run's. Other work dirs are left to the cache bound (which keeps fresh ones)."""
    folder, now = cache_root / "work", time.time() if now is None else now
    if folder.is_symlink() or not folder.is_dir():
        return []
    out = []
    for w in sorted(folder.iterdir()):
        if w.name not in done or w.is_symlink() or w.name in keep:
            continue
        size, last = usage(w)
        if now - last >= running_hours * HOUR:
            out.append(Decision(kind="work", name=f"work/{w.name}", where=str(w), bytes=size, action="delete",
                                reason=f"its run under {root} completed or is deleted: nothing in it is needed"))
    return out


def gc(root: str, dry_run: bool = False, keep_runs: int = 14, keep_incomplete_hours: float = 24.0,
       cache_max_gb: float | None | Literal["env"] = "env", in_use: list[str] = (),
       since: float | None = None, running: str | None = None, said: dict[str, str] | None = None) -> GcReport:
    """Apply run retention to root and the size bound to SMOLFLOW_CACHE; dry_run lists without deleting
    (`running`: the run calling it, whose work dir stays; `said`: see plan_runs)."""

    max_gb = default_max_gb() if cache_max_gb == "env" else cache_max_gb
    runs = plan_runs(root, keep_runs, keep_incomplete_hours, running=running, said=said)
    freed = apply_runs(runs, dry_run)
    work = plan_work_dirs(root, cache_root(), {d.name for d in runs if d.complete or d.action == "delete"},
                          keep={running} if running else set(), running_hours=keep_incomplete_hours)
    freed += apply_cache(work, dry_run)
    own = [str(cache_root() / "work" / running)] if running else []
    # Deleted by now, unless this is a dry run: then the work dir checkpoints that the runs' plan removes
    # must not count in the cache's rows either (they showed there too, with their GBs).
    gone = frozenset(_files(_work_checkpoints(d.name.split("/")[0]) for d in runs
                            if d.kind == "checkpoints" and d.action == "delete")) if dry_run else frozenset()
    cache = plan_cache(max_gb, [*in_use, *own], since, keep_incomplete_hours, skip={d.where for d in work}, gone=gone)
    freed += apply_cache(cache, dry_run)
    logs = plan_wandb_logs()
    freed += apply_logs(logs, dry_run)
    return GcReport(root=ArtifactStore(root).uri, cache=str(cache_root()), dry_run=dry_run,
                    decisions=runs + work + cache + logs, freed_bytes=freed)
