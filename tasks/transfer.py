"""Put a folder that already exists somewhere into a run folder without a needless second copy.

A published model is written once and never modified in place (every write replaces whole files,
tasks/storage.py), so two run folders may share its bytes:
- local -> local: hard links (same inode, no new blocks); a copy only across file systems;
- s3 -> s3: S3's server-side CopyObject (s3fs `copy`): the bytes never leave the server;
- anything else (local <-> S3): download/upload, the one case that must move bytes.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
from pathlib import Path

from tasks.runtime import disk_full
from tasks.storage import ArtifactStore

_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES)


def link_or_copy_file(src: Path, dest: Path) -> str:
    """Hard-link src to dest (replacing dest); copy when a link is impossible. Returns 'link' or 'copy'."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    staging.unlink(missing_ok=True)
    try:
        try:
            os.link(src, staging)
            how = "link"
        except OSError as err:
            if err.errno not in _NO_LINK:
                raise
            shutil.copyfile(src, staging)  # another file system (or links refused): the bytes must move
            how = "copy"
        os.replace(staging, dest)  # whole or not at all, like every other write to a run folder
    except BaseException as err:  # a full disk, a stop signal: no staging file left for a re-run's manifest to list
        staging.unlink(missing_ok=True)
        if isinstance(err, OSError) and (full := disk_full(err, dest.parent)) is not None:
            raise full from err  # where, the room left and what to do; not "src -> dest.tmp123"
        raise
    return how


def place_dir(src_uri: str, dest: ArtifactStore, rel: str) -> tuple[str, dict[str, int]]:
    """Make dest/rel hold the files below src_uri. Returns (dest URI, {'link'|'copy'|'server-copy'|
    'transfer': files})."""
    src = ArtifactStore(src_uri)
    counts: dict[str, int] = {}
    if not src.is_s3 and not dest.is_s3:
        base = Path(src.root)
        for file in sorted(base.rglob("*")):
            if file.is_file():
                how = link_or_copy_file(file, Path(dest._path(posixpath.join(rel, file.relative_to(base).as_posix()))))
                counts[how] = counts.get(how, 0) + 1
        return dest.url(rel), counts
    if src.is_s3 and dest.is_s3:
        for path in src.fs.find(src.root):
            target = dest._path(posixpath.join(rel, posixpath.relpath(path, src.root)))
            dest._retrying(f"server-side copy of s3://{path}", dest.fs.copy, path, target)
            counts["server-copy"] = counts.get("server-copy", 0) + 1
        return dest.url(rel), counts
    # Mixed local/S3: the one case where the bytes have to travel.
    if dest.is_s3:
        uri = dest.upload_dir(Path(src.root), rel)
    else:
        uri = dest.url(rel)
        src.download_dir("", Path(dest._path(rel)))
    counts["transfer"] = len(src.list_files())
    return uri, counts


def model_exists(uri: str) -> bool:
    """Whether a model folder (local or S3) is still there."""
    try:
        return ArtifactStore(uri).exists("config.json")
    except FileNotFoundError:
        return False


def locate_model(ref, root: str):
    """The ModelRef itself when its folder exists; else the same model (by fingerprint) in a
    completed run under root, e.g. a later run that published it; None when none holds it."""
    from tasks.storage import completed_runs, read_run

    if model_exists(ref.path):
        return ref
    for run_id in sorted(completed_runs(root), reverse=True):
        try:
            tuned = read_run(root, run_id).get("tuned_model") or {}
        except FileNotFoundError:
            continue  # deleted between the listing and the read
        if tuned.get("fingerprint") == ref.fingerprint and tuned.get("path") and model_exists(tuned["path"]):
            return ref.model_copy(update={"path": tuned["path"]})
    return None


def release_work(work: Path, run: ArtifactStore, fingerprint: str) -> None:
    """Training finished and its model is in the run folder: the local checkpoints (GBs on real
    models) go. The local model copy goes too on a local root (the run folder has the same inodes);
    on S3 it becomes the download cache's copy, which the stages that follow would fetch anyway."""
    from tasks.runtime import cache_dir

    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    final, cached = work / "model", cache_dir("downloads") / fingerprint[:16]
    if run.is_s3 and not (cached / "config.json").exists():
        shutil.rmtree(cached, ignore_errors=True)
        final.rename(cached)
        os.utime(cached)  # just used: last in line for the cache bound
    shutil.rmtree(final, ignore_errors=True)


def run_root(run_uri: str) -> str:
    """<root> of a run folder <root>/runs/<run_id>."""
    return posixpath.dirname(posixpath.dirname(run_uri.rstrip("/")))
