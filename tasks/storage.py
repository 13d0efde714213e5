"""The artifact store: one small interface over fsspec for local directories and S3.

S3 settings come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), which s3fs reads itself, so credentials never pass through
smolflow's parameters or logs.

Layout below a root (docs/storage.md):
    <root>/runs/<run_id>/{config.json, data/, checkpoints/, model/, samples/, benchmarks/,
                          report/, ..., manifest.json}
    <root>/pointers/<flow_name>/{latest,promoted}.json
`manifest.json` is written last and lists every object's size and sha256: a run folder without
one is incomplete, and the readers here (completed_runs, read_run, pointers) ignore it.
Every object is written whole or not at all: S3 PUTs and multipart uploads become visible only
when complete, and local writes go through a temporary file and a rename.
"""

from __future__ import annotations

import copy
import hashlib
import json
import posixpath
import re
import time
from pathlib import Path
from typing import Any

import fsspec
import fsspec.asyn

from tasks import layout
from tasks.layout import RunPaths
from tasks.runtime import atomic_write, remembered_digest, run_logger, sha256_file, sha256_stream
from tasks.storage_errors import StorageError, clear_s3_errors, endpoint_problem, local_problem, s3_problem, transient

# s3fs uploads a file of at least twice this size as a multipart upload in parts of this size
# (S3's minimum part is 5 MiB); a failed part fails the upload, which is then retried whole.
PART_SIZE = 16 * 2**20
# Backoff between whole-upload attempts on transient errors (connection refused or reset,
# timeouts, 5xx): ~1 min in all, on top of botocore's own quick retries of each request.
UPLOAD_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class IncompleteRunError(FileNotFoundError):
    """A run folder without manifest.json: still being written, or abandoned."""


class IntegrityError(RuntimeError):
    """Stored bytes do not match the run's manifest (size or sha256)."""




def json_bytes(obj: Any) -> bytes:
    """How every JSON object is stored: indented, UTF-8, one final newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode()


class ArtifactStore:
    """A root URI (local path, file:// or s3://) and the files below it.

    On S3, failures to reach or use the store (credentials, endpoint, bucket) raise StorageError;
    a missing object is still FileNotFoundError.
    """

    def __init__(self, uri: str, part_size: int = PART_SIZE, retry_delays: tuple[float, ...] = UPLOAD_RETRY_DELAYS):
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri.rstrip("/")
        self.is_s3 = self.uri.split("://")[0] in ("s3", "s3a")
        self.part_size, self.retry_delays = part_size, retry_delays
        # fsspec reuses filesystem instances, and an S3 one keeps the AWS_* settings it first saw:
        # a fresh one per store picks up the current environment (e.g. corrected credentials).
        # No listings cache: a reader must see objects another process wrote a moment ago.
        s3 = {"skip_instance_cache": True, "use_listings_cache": False, "default_block_size": part_size}
        if self.is_s3 and (problem := endpoint_problem()):
            raise StorageError(f"S3 storage error for {self.uri}: {problem}.")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(s3 if self.is_s3 else {}))
        self.bucket = self.root.split("/")[0] if self.is_s3 else ""

    def _retrying(self, what: str, fn, *args, **kwargs):
        """fn(*args), retried with backoff while S3 fails transiently (e.g. a restarting server)."""
        for attempt, delay in enumerate((*self.retry_delays, None), start=1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if delay is None or not self.is_s3 or not transient(err):
                    raise
                run_logger().warning("%s failed (%s: %s); attempt %d of %d in %g s", what,
                                     type(err).__name__, err, attempt + 1, len(self.retry_delays) + 1, delay)
                time.sleep(delay)

    def check_access(self) -> None:
        """Raise StorageError unless this root can be used now (on S3: credentials, endpoint and
        bucket; locally: the folder, or the nearest one above it that exists, writable), so a run
        says so before it starts, not at its first write. Nothing is left behind."""
        if self.is_s3 and not self.exists():
            try:  # exists() is False for a missing bucket and for wrong credentials alike: a listing says which
                self.fs.ls(self.bucket, refresh=True)
            except Exception as err:  # a new root in a bucket this process can list is fine
                raise StorageError(f"S3 storage error for {self.uri}: {s3_problem(self, err) or err}.") from None
        if not self.is_s3 and (problem := local_problem(self.root)):
            raise StorageError(f"{self.uri}: {problem}")

    def _bucket_exists(self) -> bool:
        try:
            return self.fs.exists(self.bucket)
        except Exception:
            return True  # unknown: let the original error speak

    def child(self, *parts: str) -> ArtifactStore:
        """The store below rel; it shares this store's file system (a new S3 client costs ~0.5 s)."""
        below = copy.copy(self)
        below.uri, below.root = posixpath.join(self.uri, *parts), posixpath.join(self.root, *parts)
        return below

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        return posixpath.join(self.uri, rel) if rel else self.uri

    @clear_s3_errors
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write one object whole: readers see the old one or the new one, never a part."""
        path = self._path(rel)
        if self.is_s3:  # one PUT (multipart above part_size): visible only once complete
            self._retrying(f"upload of {self.url(rel)}", self.fs.pipe_file, path, data, chunksize=self.part_size)
        else:
            atomic_write(path, data)
        return self.url(rel)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, json_bytes(obj))

    @clear_s3_errors
    def read_seen(self, rel: str) -> tuple[bytes | None, str | None]:
        """(contents, version) of one small object, or (None, None) if missing: the version names
        what was read, for `write_if_unchanged`. On S3 the ETag of the same GET; locally a sha256."""
        if not self.is_s3:
            try:
                data = Path(self._path(rel)).read_bytes()
            except FileNotFoundError:
                return None, None
            return data, hashlib.sha256(data).hexdigest()
        bucket, key, _ = self.fs.split_path(self._path(rel))

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await response["Body"].read(), response["ETag"]
            finally:
                response["Body"].close()

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    @clear_s3_errors
    def write_if_unchanged(self, rel: str, data: bytes, seen: str | None) -> bool:
        """Write one small object unless it changed since `read_seen` gave `seen` (None: it was
        missing); False, writing nothing, if it did. On S3 a conditional PUT (If-Match, or
        If-None-Match: * for a new object; AWS S3 and SeaweedFS refuse it with 412 when the object
        changed), so writers on any machine never overwrite one another's. Locally the check and
        the write are two steps: a local root's writers hold its file lock (`pointer_lock`)."""
        if not self.is_s3:
            if self.read_seen(rel)[1] != seen:
                return False
            self.write_bytes(rel, data)
            return True
        bucket, key, _ = self.fs.split_path(self._path(rel))
        condition = {"IfMatch": seen} if seen is not None else {"IfNoneMatch": "*"}
        try:
            fsspec.asyn.sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data,
                             **condition)
        except OSError as err:  # s3fs's translation of botocore's ClientError, which is its cause
            code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412"):
                return False
            if code not in ("NotImplemented", "501"):
                raise
            # A store without conditional writes: as before they existed (the lock alone), and said so.
            run_logger().warning("%s does not support conditional writes (%s): %s written without the check "
                                 "that no other machine moved it meanwhile", self.uri, code, rel)
            self.write_bytes(rel, data)
        finally:
            self.fs.invalidate_cache(self._path(rel))
        return True

    @clear_s3_errors
    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self._path(rel), "rb") as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    @clear_s3_errors
    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._path(rel))

    @clear_s3_errors
    def upload_dir(self, local: Path, rel: str) -> str:
        """Copy a local directory's files (recursively) to rel/."""
        for file in sorted(Path(local).rglob("*")):
            if file.is_file():
                dest = self._path(posixpath.join(rel, file.relative_to(local).as_posix()))
                if self.is_s3:  # S3 has no directories to make
                    self._retrying(f"upload of {file} to s3://{dest}", self.fs.put_file, str(file), dest,
                                   chunksize=self.part_size)
                else:
                    self.fs.makedirs(posixpath.dirname(dest), exist_ok=True)
                    self.fs.put_file(str(file), dest)
        return self.url(rel)

    @clear_s3_errors
    def download_dir(self, rel: str, local: Path) -> Path:
        local = Path(local)
        base = self._path(rel).rstrip("/")
        for path in self.fs.find(base):
            target = local / posixpath.relpath(path, base)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._retrying(f"download of {path}", self.fs.get_file, path, str(target))
        return local

    @clear_s3_errors
    def list_files(self, rel: str = "") -> list[str]:
        base = self._path(rel).rstrip("/")
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.relpath(p, base) for p in self.fs.find(base))

    @clear_s3_errors
    def glob(self, pattern: str) -> list[str]:
        """Paths (relative to the root) matching a glob pattern, e.g. 'runs/*/manifest.json'."""
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.glob(self._path(pattern)))

    @clear_s3_errors
    def sha256(self, rel: str) -> str:
        if not self.is_s3:  # a run's (hard-linked) model is hashed once, not once per run
            path = Path(self._path(rel))
            return remembered_digest("file", [path], lambda: sha256_file(path))
        with self.fs.open(self._path(rel), "rb") as f:
            return sha256_stream(f).hexdigest()

    @clear_s3_errors
    def size(self, rel: str) -> int:
        return int(self.fs.size(self._path(rel)))


def package_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "datasets", "prefect", "lm_eval", "wandb", "s3fs", "fsspec"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    from tasks.runtime import code_version

    versions["smolflow"] = code_version()  # the report's "code": version and git commit (+dirty)
    return versions


# Not in a manifest: the manifest itself, and status.json, which says "complete" once the manifest is written.
UNHASHED = (RunPaths.manifest, RunPaths.status)


def write_manifest(run_uri: str, extra: dict[str, Any]) -> str:
    """Hash every object in the run folder and write manifest.json last, marking the run complete."""
    store = ArtifactStore(run_uri)
    objects = [
        {"path": rel, "size": store.size(rel), "sha256": store.sha256(rel)}
        for rel in store.list_files()
        if rel not in UNHASHED
    ]
    manifest = {"run": run_uri, "objects": objects, "versions": package_versions(), **extra}
    return store.write_json(RunPaths.manifest, manifest)


# ---- Readers: only completed runs (those with a manifest) exist for them. ----

def completed_runs(root: str) -> list[str]:
    """Ids of the runs under <root>/runs/ that have a manifest; incomplete runs are left out."""
    return [path.split("/")[1] for path in ArtifactStore(root).glob(f"{layout.RUNS}/*/{RunPaths.manifest}")]


def read_manifest(run: str | ArtifactStore) -> dict[str, Any]:
    """The manifest of a completed run; IncompleteRunError when the run has none (yet)."""
    run = run if isinstance(run, ArtifactStore) else ArtifactStore(run)
    try:
        return run.read_json(RunPaths.manifest)
    except FileNotFoundError:
        raise IncompleteRunError(f"{run.url(RunPaths.manifest)} does not exist: the run is incomplete "
                                 "(still running, or it failed), and readers ignore it") from None


def read_run(root: str, run_id: str) -> dict[str, Any]:
    """The manifest of run `run_id` under root, if that run completed (see read_manifest)."""
    return read_manifest(ArtifactStore(root).child(layout.run_dir(run_id)))


def _split_run_uri(uri: str) -> tuple[str, str] | None:
    """(run folder URI, path inside it) for a URI below .../runs/<run_id>/, else None."""
    match = re.match(r"^(.*/runs/[^/]+)(?:/(.*))?$", uri.rstrip("/"))
    return (match.group(1), match.group(2) or "") if match else None


def _check(manifest: dict[str, Any], prefix: str, actual: dict[str, tuple[int, str]], where: str) -> None:
    """Compare {path below prefix: (size, sha256)} with the manifest's entries below prefix."""
    base = prefix.rstrip("/") + "/" if prefix else ""
    expected = {o["path"][len(base):]: (o["size"], o["sha256"]) for o in manifest["objects"]
                if o["path"].startswith(base) and o["path"] not in UNHASHED}  # older manifests hashed status.json
    actual = {rel: found for rel, found in actual.items() if base + rel not in UNHASHED}
    problems = [f"{rel}: missing" for rel in sorted(set(expected) - set(actual))]
    problems += [f"{rel}: not in the manifest" for rel in sorted(set(actual) - set(expected))]
    problems += [f"{rel}: size/sha256 {actual[rel][0]}/{actual[rel][1][:12]}, manifest says "
                 f"{expected[rel][0]}/{expected[rel][1][:12]}"
                 for rel in sorted(set(expected) & set(actual)) if actual[rel] != expected[rel]]
    if problems:
        raise IntegrityError(f"{where} does not match {manifest['run']}/manifest.json: " + "; ".join(problems)
                             + ". Re-download, or re-run the flow if the stored copy is damaged")


def verify_run(run_uri: str, prefix: str = "") -> dict[str, Any]:
    """Re-hash a completed run's stored objects (below prefix) against its manifest; return it."""
    run = ArtifactStore(run_uri)
    manifest = read_manifest(run)
    base = prefix.rstrip("/") + "/" if prefix else ""
    actual = {rel: (run.size(base + rel), run.sha256(base + rel))
              for rel in run.list_files(prefix) if base + rel not in UNHASHED}
    _check(manifest, prefix, actual, run.url(prefix))
    return manifest


def download_verified(uri: str, local: Path) -> Path:
    """Download a folder of a run (model/, checkpoints/...) and check every file against the
    run's manifest. A run still in progress has no manifest yet: its files are not checked here."""
    store = ArtifactStore(uri)
    store.download_dir("", local)
    found = _split_run_uri(store.uri)
    run = ArtifactStore(found[0]) if found else None
    if run is None or not run.exists(RunPaths.manifest):
        return Path(local)
    prefix = found[1]
    manifest = read_manifest(run)
    actual = {}
    for file in Path(local).rglob("*"):
        if file.is_file():
            actual[file.relative_to(local).as_posix()] = (file.stat().st_size, sha256_file(file))
    _check(manifest, prefix, actual, f"download of {store.uri}")
    run_logger().info("Downloaded %s: %d files match its run's manifest", store.uri, len(actual))
    return Path(local)
