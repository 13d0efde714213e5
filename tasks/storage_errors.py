"""What goes wrong with an artifact store, said in one line: S3 failures re-raised as StorageError
naming the URI and what to check (never the secret key), which failures are worth another try, and
an S3 endpoint setting that cannot work, refused before any request."""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from pathlib import Path

from tasks.runtime import redact_url

EXAMPLE_ENDPOINT = "http://127.0.0.1:8333"


class StorageError(OSError):
    """A store could not be used: bad credentials, unreachable endpoint, missing bucket, a local
    folder that cannot be written. The message names the URI and what to check, never the secret key."""


def s3_endpoint() -> tuple[str, str | None]:
    """(setting, value): the endpoint s3fs will use, picked as fsspec and botocore pick it."""
    if os.environ.get("FSSPEC_S3_ENDPOINT_URL"):  # fsspec passes it to s3fs as endpoint_url
        return "FSSPEC_S3_ENDPOINT_URL", os.environ["FSSPEC_S3_ENDPOINT_URL"]
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):  # the service's own first
            if os.environ.get(name):
                return name, os.environ[name]
    return "AWS_ENDPOINT_URL", None


def endpoint_problem() -> str | None:
    """Why the S3 endpoint setting cannot work, said before botocore does it in a traceback (a
    user:password@ in it was even retried as if transient). Never quotes a URL holding '@'."""
    from urllib.parse import urlsplit

    name, endpoint = s3_endpoint()
    if not endpoint:
        return None
    if "@" in endpoint:  # before parsing: a password with '/' or '#' in it ends the host part early
        return (f"{name} carries credentials (user:password@), which S3 does not take from the URL. "
                "Remove them and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        return f"{name} is not a URL. Set it to e.g. {EXAMPLE_ENDPOINT}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{name}={redact_url(endpoint)} is not an http(s)://host[:port] URL. Set it to e.g. {EXAMPLE_ENDPOINT}"
    return None


def transient(err: BaseException | None) -> bool:
    """Connection drops, timeouts and 5xx answers are worth another try; nothing else is."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    while err is not None:  # s3fs re-raises botocore errors as OSError "from" them
        if isinstance(err, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
            return True
        if isinstance(err, ClientError) and err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
            return True
        err = err.__cause__ or err.__context__
    return False


def s3_problem(store, err: Exception) -> str | None:
    """What to tell the user about an S3 failure; None for errors that speak for themselves."""
    from botocore.exceptions import ConnectionError as EndpointError, NoCredentialsError

    name, endpoint = s3_endpoint()
    where = f"{name}={redact_url(endpoint)}" if endpoint else "AWS (AWS_ENDPOINT_URL is not set)"
    if isinstance(err, PermissionError):
        return (f"access denied by {where} ({err}). Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: "
                "they must be valid for that endpoint and allowed to use this bucket")
    if isinstance(err, NoCredentialsError):
        return f"no credentials for {where}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if isinstance(err, EndpointError):
        return f"cannot connect to {where} ({err}). Check {name} and that the S3 server is running"
    if isinstance(err, FileNotFoundError) and not store._bucket_exists():
        return f"bucket {store.bucket!r} does not exist at {where}. Create it, or check the URI and {name}"
    return None  # e.g. a missing object in an existing bucket: FileNotFoundError as usual


def local_problem(root: str) -> str | None:
    """Why a local root cannot be written: the folder, or the nearest one above it that exists (a folder
    made there and removed at once: nothing is left)."""
    folder = Path(root)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder. Choose another folder"
    why = None
    if not os.access(folder, os.W_OK | os.X_OK):  # EROFS too (root included), EACCES for others
        why = "a read-only file system" if os.statvfs(folder).f_flag & os.ST_RDONLY else "no write permission for this user"
    else:  # access() says yes where a write still fails: /proc or /sys, an NFS export that squashes root
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".smolflow-check-", dir=folder))  # gone at once: nothing is left
        except OSError as err:
            why = err.strerror or str(err)
    if why:
        return (f"cannot write in {folder} ({why}). Choose a folder this process can write, "
                "e.g. --output.artifacts-uri ~/smolflow-runs")
    return None


def clear_s3_errors(method):
    """Re-raise S3 access failures in `method` as StorageError, naming the object's URI."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except StorageError:
            raise
        except Exception as err:
            problem = s3_problem(self, err) if self.is_s3 else None
            if problem is None:
                raise
            url = self.url(signature.bind(self, *args, **kwargs).arguments.get("rel", ""))
            message, secret = f"S3 storage error for {url}: {problem}.", os.environ.get("AWS_SECRET_ACCESS_KEY")
            raise StorageError(message.replace(secret, "***") if secret else message) from err

    return wrapper
