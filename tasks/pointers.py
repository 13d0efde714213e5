"""Pointers: <root>/pointers/<flow_name>/{latest,promoted}.json name a completed run.

They move one at a time: under `pointer_lock` (a file lock in a local root; on S3 the cache's file
lock, plus the Prefect server's limit when one is configured), and on S3 by a compare-and-swap
as well (`swap_pointer`: a conditional PUT), so machines sharing a bucket but no Prefect server
never overwrite a pointer another one moved (docs/operations.md#promotion).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks import layout
from tasks.layout import RunPaths
from tasks.storage import ArtifactStore, json_bytes, read_manifest, write_manifest


def _pointer(store: ArtifactStore, flow_name: str, name: str, run_id: str,
             by_hand: dict[str, Any] | None = None) -> dict[str, Any]:
    run = store.child(layout.run_dir(run_id))
    read_manifest(run)  # a pointer never names an incomplete run
    return {"flow": flow_name, "name": name, "run_id": run_id, "run_uri": run.uri,
            "manifest_sha256": run.sha256(RunPaths.manifest), "updated_at": datetime.now(timezone.utc).isoformat(),
            **({"by_hand": by_hand} if by_hand else {})}


def set_pointer(root: str, flow_name: str, name: str, run_id: str) -> str:
    """Point `name` (e.g. latest, promoted) of a flow at a completed run, written whole in one object."""
    store = ArtifactStore(root)
    return store.write_json(layout.pointer(flow_name, name), _pointer(store, flow_name, name, run_id))


def swap_pointer(root: str, flow_name: str, name: str, run_id: str, seen: str | None,
                 by_hand: dict[str, Any] | None = None) -> str | None:
    """`set_pointer`, unless the pointer changed since `read_pointer_seen` gave `seen`: then None
    (on S3 a conditional PUT: whichever machine moved it, nothing is overwritten unseen)."""
    store, rel = ArtifactStore(root), layout.pointer(flow_name, name)
    written = store.write_if_unchanged(rel, json_bytes(_pointer(store, flow_name, name, run_id, by_hand)), seen)
    return store.url(rel) if written else None


def promote_by_hand(root: str, flow_name: str, run_id: str, reason: str) -> tuple[dict[str, Any], str | None]:
    """Point `promoted` at a completed fine-tuning run a person chose (a roll-back after a bad night,
    or a model whose gate said no for a reason judged spurious); the next run's gate compares with
    it. The pointer says so (`by_hand`: reason, who, the run it named before). (pointer, before)."""
    import getpass
    import socket

    store = ArtifactStore(root)
    run = store.child(layout.run_dir(run_id.replace("/", "_")))
    if "/" in run_id or run_id.startswith(".") or not run.exists(RunPaths.config):
        raise ValueError(f"no run {run_id!r} under {store.uri} (`smolflow runs --root {root}` lists them)")
    if not run.exists(RunPaths.manifest):
        raise ValueError(f"run {run_id!r} did not complete (no {RunPaths.manifest}): only a completed run can be "
                         "promoted (`smolflow runs` says how it ended)")
    if read_manifest(run).get("kind") == "eval" or not run.exists(f"{RunPaths.model}/config.json"):
        raise ValueError(f"run {run_id!r} holds no tuned model (a `smolflow eval` run scores a model it did not "
                         "train): promote the run that trained it")
    with pointer_lock(root, f"promote {run_id} by hand"):
        while True:  # on S3 another machine may move it meanwhile: then it is read again
            current, seen = read_pointer_seen(root, flow_name, "promoted")
            before = current["run_id"] if current else None
            if before == run_id:
                return current, before
            by_hand = {"reason": reason, "by": f"{getpass.getuser()}@{socket.gethostname()}", "before": before}
            if swap_pointer(root, flow_name, "promoted", run_id, seen, by_hand) is not None:
                return read_pointer(root, flow_name, "promoted"), before


def read_pointer(root: str, flow_name: str, name: str) -> dict[str, Any] | None:
    """The pointer object ({run_id, run_uri, manifest_sha256, updated_at}), or None if never set."""
    try:
        return ArtifactStore(root).read_json(layout.pointer(flow_name, name))
    except FileNotFoundError:
        return None


def read_pointer_seen(root: str, flow_name: str, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """`read_pointer`, with the version read, for `swap_pointer`."""
    data, seen = ArtifactStore(root).read_seen(layout.pointer(flow_name, name))
    return (json.loads(data) if data is not None else None), seen


def pointer_lock(root: str, holder: str) -> contextlib.AbstractContextManager[dict]:
    """The promotion lock over `root`'s pointers, so that they move one at a time. On a local root its
    file sits with them, so every process writing the root takes the same one, whatever its
    SMOLFLOW_CACHE (another user's, a container's); on S3, SMOLFLOW_CACHE's, plus the Prefect
    server's global concurrency limit when one is configured (tasks/locks.py)."""
    from tasks.locks import PROMOTION_LOCK, exclusive

    store, directory = ArtifactStore(root), None
    if not store.is_s3:
        directory = Path(store.root) / layout.POINTERS
        directory.mkdir(parents=True, exist_ok=True)
    return exclusive(PROMOTION_LOCK, holder, directory)


def set_latest(root: str, flow_name: str, run_id: str) -> str:
    """Point the flow's `latest` at this run, once its manifest is written."""
    with pointer_lock(root, f"latest {run_id}"):  # pointers move one at a time (rewrite_manifest)
        return set_pointer(root, flow_name, "latest", run_id)


def rewrite_manifest(run: ArtifactStore, flow_name: str) -> None:
    """Hash a completed run folder again (files came after its manifest: the W&B run's, uploaded
    once it closed, after promotion), and give the pointers that still name the run the new
    manifest's sha256; one moved to another run meanwhile stays (under the promotion lock, and on
    S3 by `write_if_unchanged`)."""
    manifest = run.read_json(RunPaths.manifest)
    write_manifest(run.uri, {k: v for k, v in manifest.items() if k not in ("run", "objects", "versions")})
    root, run_id = posixpath.dirname(posixpath.dirname(run.uri.rstrip("/"))), posixpath.basename(run.uri.rstrip("/"))
    with pointer_lock(root, f"re-point {run_id}"):
        for name in ("latest", "promoted"):
            while True:  # on S3 another machine may move it meanwhile: then it is read again
                pointer, seen = read_pointer_seen(root, flow_name, name)
                if pointer is None or pointer["run_id"] != run_id:
                    break
                fresh = pointer | {"manifest_sha256": run.sha256(RunPaths.manifest)}
                if ArtifactStore(root).write_if_unchanged(layout.pointer(flow_name, name), json_bytes(fresh), seen):
                    break
