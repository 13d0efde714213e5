"""The artifact store: one small interface over fsspec for local directories and S3.

S3 settings come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), which s3fs reads itself, so credentials never pass through
smolflow's parameters or logs.

Layout of one run (see README):  <root>/runs/<run_id>/{config.json, model/, samples/,
benchmarks/, report/, manifest.json}. `manifest.json` is written last: a run folder without
one is incomplete.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import posixpath
from pathlib import Path
from typing import Any

import fsspec
from prefect import task
from prefect.cache_policies import NO_CACHE


class StorageError(OSError):
    """An S3 store could not be used: bad credentials, unreachable endpoint or missing bucket.
    The message names the URI and what to check, never the secret key."""


def _s3_problem(store: ArtifactStore, err: Exception) -> str | None:
    """What to tell the user about an S3 failure; None for errors that speak for themselves."""
    from botocore.exceptions import ConnectionError as EndpointError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    where = f"AWS_ENDPOINT_URL={endpoint}" if endpoint else "AWS (AWS_ENDPOINT_URL is not set)"
    if isinstance(err, PermissionError):
        return (f"access denied by {where} ({err}). Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: "
                "they must be valid for that endpoint and allowed to use this bucket")
    if isinstance(err, NoCredentialsError):
        return f"no credentials for {where}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if isinstance(err, EndpointError):
        return f"cannot connect to {where} ({err}). Check AWS_ENDPOINT_URL and that the S3 server is running"
    if isinstance(err, FileNotFoundError) and not store._bucket_exists():
        return f"bucket {store.bucket!r} does not exist at {where}. Create it, or check the URI and AWS_ENDPOINT_URL"
    return None  # e.g. a missing object in an existing bucket: FileNotFoundError as usual


def _clear_s3_errors(method):
    """Re-raise S3 access failures in `method` as StorageError, naming the object's URI."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self: ArtifactStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except StorageError:
            raise
        except Exception as err:
            problem = _s3_problem(self, err) if self.is_s3 else None
            if problem is None:
                raise
            url = self.url(signature.bind(self, *args, **kwargs).arguments.get("rel", ""))
            message, secret = f"S3 storage error for {url}: {problem}.", os.environ.get("AWS_SECRET_ACCESS_KEY")
            raise StorageError(message.replace(secret, "***") if secret else message) from err

    return wrapper


class ArtifactStore:
    """A root URI (local path, file:// or s3://) and the files below it.

    On S3, failures to reach or use the store (credentials, endpoint, bucket) raise StorageError;
    a missing object is still FileNotFoundError.
    """

    def __init__(self, uri: str):
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri.rstrip("/")
        self.is_s3 = self.uri.split("://")[0] in ("s3", "s3a")
        # fsspec reuses filesystem instances, and an S3 one keeps the AWS_* settings it first saw:
        # a fresh one per store picks up the current environment (e.g. corrected credentials).
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **({"skip_instance_cache": True} if self.is_s3 else {}))
        self.bucket = self.root.split("/")[0] if self.is_s3 else ""

    def _bucket_exists(self) -> bool:
        try:
            return self.fs.exists(self.bucket)
        except Exception:
            return True  # unknown: let the original error speak

    @classmethod
    def from_uri(cls, uri: str) -> ArtifactStore:
        return cls(uri)

    def child(self, *parts: str) -> ArtifactStore:
        return ArtifactStore(posixpath.join(self.uri, *parts))

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        return posixpath.join(self.uri, rel) if rel else self.uri

    @_clear_s3_errors
    def write_bytes(self, rel: str, data: bytes) -> str:
        path = self._path(rel)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)
        return self.url(rel)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_text(rel, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")

    @_clear_s3_errors
    def read_json(self, rel: str) -> Any:
        with self.fs.open(self._path(rel), "rb") as f:
            return json.load(f)

    @_clear_s3_errors
    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._path(rel))

    @_clear_s3_errors
    def upload_dir(self, local: Path, rel: str) -> str:
        """Copy a local directory's files (recursively) to rel/."""
        for file in sorted(Path(local).rglob("*")):
            if file.is_file():
                dest = self._path(posixpath.join(rel, file.relative_to(local).as_posix()))
                self.fs.makedirs(posixpath.dirname(dest), exist_ok=True)
                self.fs.put_file(str(file), dest)
        return self.url(rel)

    @_clear_s3_errors
    def download_dir(self, rel: str, local: Path) -> Path:
        local = Path(local)
        base = self._path(rel).rstrip("/")
        for path in self.fs.find(base):
            target = local / posixpath.relpath(path, base)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(target))
        return local

    @_clear_s3_errors
    def list_files(self, rel: str = "") -> list[str]:
        base = self._path(rel).rstrip("/")
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.relpath(p, base) for p in self.fs.find(base))

    @_clear_s3_errors
    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(self._path(rel), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @_clear_s3_errors
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
    return versions


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30])
def write_manifest(run_uri: str, extra: dict[str, Any]) -> str:
    """Hash every object in the run folder and write manifest.json last, marking the run complete."""
    store = ArtifactStore(run_uri)
    objects = [
        {"path": rel, "size": store.size(rel), "sha256": store.sha256(rel)}
        for rel in store.list_files()
        if rel != "manifest.json"
    ]
    manifest = {"run": run_uri, "objects": objects, "versions": package_versions(), **extra}
    return store.write_json("manifest.json", manifest)
