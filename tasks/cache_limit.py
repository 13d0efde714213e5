"""A size bound on smolflow's local cache (SMOLFLOW_CACHE): least recently used entries go first.

An entry is one child of a managed folder: models/<name> (the converted built-in model and
templated models), downloads/<fingerprint>, datasets/<fingerprint> (+ checked-*.json indexes),
tokenized/<key>, tokenizers/<key>.json, digests/<key>, judgements/<key>.json, results/<key> (Prefect's
task results: tasks/caching.py), checks/<benchmark>-<key>.json, win-rates/<key>.json, work/<run_id>.
Each is re-made when missing (the built-in model is converted again, a download fetched again,
a file hashed again, ...), so evicting one costs time, never a run.
Never evicted: what the current run used (named, or used/written since it started), a
work/<run_id> or staging `.tmp<pid>` entry written within the last hours (a run still at work).
A folder is deleted by renaming it to `<name>.del<pid>` first (remove_entry), so that a deletion
cut off midway never leaves a half entry under its own name.
A managed folder that is a symlink (e.g. tests share one converted model across caches) belongs to
another cache and is left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tasks.runtime import cache_root, run_logger

HOUR = 3600.0


class Decision(BaseModel):
    """What happens to one run folder or cache entry, and why."""

    kind: Literal["run", "checkpoints", "cache", "work", "log"]
    name: str  # run id, or the cache entry's path below SMOLFLOW_CACHE
    where: str  # full URI or path
    bytes: int
    action: Literal["delete", "keep"]
    reason: str
    complete: bool | None = None  # runs: whether it has a manifest


KINDS = ("models", "downloads", "datasets", "tokenized", "tokenizers", "digests", "judgements", "arena-answers",
         "results", "checks", "win-rates", "work")
_STAGING = re.compile(r"\.tmp\d+$")
# An entry being deleted is first renamed to <name>.del<pid> (remove_entry): one left is garbage.
_DOOMED = re.compile(r"\.del\d+$")



def default_max_gb() -> float | None:
    """SMOLFLOW_CACHE_MAX_GB for commands run outside a flow (`gc`); 'none' or '' means unbounded."""
    value = os.environ.get("SMOLFLOW_CACHE_MAX_GB", "20").strip().lower()
    if value in ("", "none"):
        return None
    try:
        gb = float(value)
    except ValueError:
        gb = -1.0
    if not 0 <= gb < float("inf"):  # -3 or nan would evict the whole cache
        raise ValueError(f"SMOLFLOW_CACHE_MAX_GB={value!r} is not a number of GB; set e.g. 20 (0 or more), or 'none'")
    return gb


def usage(path: Path, seen: set[tuple[int, int]] | None = None) -> tuple[int, float]:
    """(bytes on disk, last use = newest file atime/mtime or folder mtime) of a file or folder; hard
    links count once in `seen`."""
    seen = set() if seen is None else seen
    total, last = 0, 0.0
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else [])]:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue  # removed while we walk
        # A folder's atime changes whenever it is listed, a symlink's whenever it is followed (this
        # walk included: W&B's debug.log and latest-run links kept a failed run's work dir "written
        # 0.0 h ago" for good, so it outlived its deleted run folder): only their mtime counts.
        regular = stat.S_ISREG(st.st_mode)
        last = max(last, st.st_mtime, st.st_atime if regular else 0.0)
        if regular and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total, last


def _covers(entry: Path, used: set[Path]) -> bool:
    return any(u == entry or entry in u.parents for u in used)


def plan_cache(max_gb: float | None, in_use: list[str] = (), since: float | None = None,
               running_hours: float = 24.0, root: Path | None = None, now: float | None = None,
               skip: set[str] = frozenset(), gone: frozenset[tuple[int, int]] = frozenset()) -> list[Decision]:
    """Which cache entries to evict, least recently used first, until the cache fits in max_gb
    (entries in `skip`, already decided elsewhere, neither count nor appear; files in `gone`, as
    (st_dev, st_ino), are about to be deleted and do not count)."""
    root, now = root or cache_root(), time.time() if now is None else now
    used = {Path(p).resolve() for p in in_use if p and "://" not in p}
    entries = []
    for kind in KINDS:
        folder = root / kind
        if folder.is_symlink() or not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not entry.is_symlink() and str(entry) not in skip:
                size, last = usage(entry, set(gone))
                entries.append((last, entry, size, kind))
    total = sum(e[2] for e in entries)
    limit = None if max_gb is None else max_gb * 1e9
    out = []
    for last, entry, size, kind in sorted(entries, key=lambda e: e[0]):
        name, idle_h = str(entry.relative_to(root)), (now - last) / HOUR
        fresh_work = (kind == "work" or _STAGING.search(entry.name)) and idle_h < running_hours
        if _DOOMED.search(entry.name):  # never in use, however recent its files
            action, why = "delete", "the rest of an eviction that was cut off (a stop signal or a kill)"
        elif _covers(entry.resolve(), used):
            action, why = "keep", "used by the current run"
        elif since is not None and last >= since:
            action, why = "keep", "used or written during the current run"
        elif fresh_work:
            action, why = "keep", f"written {idle_h:.1f} h ago: a run may still be using it"
        elif _STAGING.search(entry.name):
            action, why = "delete", f"staging left by a crashed process, untouched for {idle_h:.1f} h"
        elif limit is not None and total > limit:
            action, why = "delete", f"least recently used ({idle_h:.1f} h ago) while the cache is over {max_gb:g} GB"
        else:
            action, why = "keep", "within the cache bound" if limit is not None else "the cache is unbounded"
        if action == "delete":
            total -= size
        out.append(Decision(kind="cache", name=name, where=str(entry), bytes=size, action=action, reason=why))
    return out


def remove_entry(path: Path) -> None:
    """Delete one entry. A folder is renamed out of the way first, in one step: readers take an entry
    whose marker file is there as whole (config.json, stats.json), and an rmtree cut off by a cancel
    in Prefect (SIGTERM) or a kill left one with its marker and without its weights or tokens,
    which every later run reused and failed on. What such a cut leaves now is <name>.del<pid>,
    which no reader looks for and the next plan_cache deletes."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f"{path.name}.del{os.getpid()}")
        shutil.rmtree(doomed, ignore_errors=True)  # a dead process's with a reused pid: the rename needs the name
        try:
            path.rename(doomed)
        except FileNotFoundError:
            return  # another process removed it meanwhile
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def apply_cache(decisions: list[Decision], dry_run: bool = False) -> int:
    """Evict the entries marked delete (unless dry_run); returns the bytes freed (or to be freed)."""
    freed, log = 0, run_logger()
    for d in decisions:
        if d.kind in ("cache", "work") and d.action == "delete":
            if not dry_run:
                remove_entry(Path(d.where))
            log.info("%s %s (%.1f MB): %s", "Would evict" if dry_run else "Evicted", d.name, d.bytes / 1e6, d.reason)
            freed += d.bytes
    return freed


def mark_used(paths: list[str], root: Path | None = None) -> None:
    """Stamp the cache entries holding these paths as used now (reads alone may not update atime)."""
    root = (root or cache_root()).resolve()
    for p in paths:
        if not p or "://" in p:
            continue
        path = Path(p).resolve()
        if root in path.parents and len(path.relative_to(root).parts) >= 2:
            entry = root.joinpath(*path.relative_to(root).parts[:2])
            if entry.exists():
                os.utime(entry)
