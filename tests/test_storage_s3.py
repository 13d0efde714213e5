"""ArtifactStore against a real S3 server (SeaweedFS) and a local directory: same behaviour.

No mocks: the S3 cases talk to `weed mini` started by tests/s3.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import socket
import traceback
from pathlib import Path

import pytest

from tasks.storage import ArtifactStore, StorageError, write_manifest

TREE = {
    "config.json": b'{"lr": 0.001}\n',
    "weights.bin": bytes(range(256)) * 1024,  # 256 KiB
    "tokenizer/vocab.txt": "héllo\nwörld\n".encode(),
    "tokenizer/deep/er/merges.txt": b"a b\n",
    "empty.txt": b"",
}


def _make_tree(root: Path) -> Path:
    for rel, data in TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The root of an empty store: a local directory, or a prefix in a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip(store_uri: str, tmp_path: Path):
    store = ArtifactStore(store_uri)
    assert store.list_files() == [] and not store.exists("model/config.json")

    assert store.upload_dir(_make_tree(tmp_path / "src"), "model") == store.url("model")
    assert store.list_files("model") == sorted(TREE)
    assert store.exists("model/tokenizer/vocab.txt") and store.exists("model/empty.txt")
    assert not store.exists("model/nope.txt")

    record = {"run": "r1", "metrics": {"loss": 0.5}, "text": "ünïcode"}
    assert store.write_json("runs/r1/config.json", record) == store.url("runs/r1/config.json")
    assert store.read_json("runs/r1/config.json") == record
    assert store.child("runs", "r1").read_json("config.json") == record
    assert store.list_files() == sorted(["runs/r1/config.json", *(f"model/{rel}" for rel in TREE)])

    for rel, data in TREE.items():
        assert store.sha256(f"model/{rel}") == hashlib.sha256(data).hexdigest()
        assert store.size(f"model/{rel}") == len(data)

    out = store.download_dir("model", tmp_path / "dst")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(TREE)
    for rel, data in TREE.items():
        assert (out / rel).read_bytes() == data

    with pytest.raises(FileNotFoundError):  # a missing object is not a StorageError
        store.read_json("runs/r1/missing.json")


def test_write_manifest(store_uri: str, tmp_path: Path):
    run = ArtifactStore(store_uri).child("runs", "r1")
    run.upload_dir(_make_tree(tmp_path / "src"), "model")
    run.write_json("config.json", {"seed": 1})

    url = write_manifest(run.uri, {"status": "completed"})

    assert url == run.url("manifest.json")
    manifest = run.read_json("manifest.json")
    assert manifest["run"] == run.uri and manifest["status"] == "completed"
    local = run.download_dir("", tmp_path / "run")  # the files as stored
    stored = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert sorted(stored) == sorted(["manifest.json", "config.json", *(f"model/{rel}" for rel in TREE)])
    del stored["manifest.json"]
    assert [o["path"] for o in manifest["objects"]] == sorted(stored)
    for entry in manifest["objects"]:
        data = stored[entry["path"]]
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert "s3fs" in manifest["versions"]


def _error_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(err))  # the message and every chained cause


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials(s3_bucket: str, s3_server, monkeypatch: pytest.MonkeyPatch, wrong: str):
    ArtifactStore(s3_bucket).write_json("ok.json", {"ok": True})  # the right credentials work
    bad_secret = "wrong-" + secrets.token_urlsafe(16)
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-key")

    store = ArtifactStore(s3_bucket + "/prefix")  # a new store sees the new environment
    with pytest.raises(StorageError) as read_error:
        store.read_json("config.json")
    with pytest.raises(StorageError) as write_error:
        store.write_json("config.json", {"a": 1})

    for err in (read_error.value, write_error.value):
        message = str(err)
        assert f"{s3_bucket}/prefix/config.json" in message
        assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message
        assert s3_server.endpoint_url in message
        text = _error_text(err)
        assert s3_server.secret_key not in text and bad_secret not in text

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)  # fixed: works again
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    assert ArtifactStore(s3_bucket).read_json("ok.json") == {"ok": True}


def test_missing_bucket(s3_bucket: str, s3_server):
    store = ArtifactStore("s3://no-such-bucket-" + secrets.token_hex(6) + "/runs")
    with pytest.raises(StorageError, match="does not exist") as error:
        store.read_json("r1/manifest.json")
    assert f"{store.uri}/r1/manifest.json" in str(error.value) and s3_server.endpoint_url in str(error.value)


def test_unreachable_endpoint(s3_bucket: str, s3_server, monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast instead of botocore's retries
    with pytest.raises(StorageError, match="cannot connect") as error:
        ArtifactStore(s3_bucket).exists("manifest.json")
    assert endpoint in str(error.value) and "AWS_ENDPOINT_URL" in str(error.value)
    assert s3_server.secret_key not in _error_text(error.value)


def test_an_endpoint_that_cannot_work_is_one_message_before_any_request(monkeypatch: pytest.MonkeyPatch):
    # user:password@ in the URL once ended in botocore's traceback ("Cannot combine AUTHORIZATION
    # header ..."), retried as if transient; a scheme botocore refuses, too.
    for endpoint, says in (("http://admin:hunter2@127.0.0.1:8333", "carries credentials (user:password@)"),
                           ("http://admin:hunter2/x@127.0.0.1:8333", "carries credentials"),  # '/' in the password
                           ("http://admin:1234/hunter2@127.0.0.1:8333", "carries credentials"),
                           ("ftp://127.0.0.1:8333", "is not an http(s)://host[:port] URL"),
                           ("http://127.0.0.1:port", "is not a URL"), ("http://[::1", "is not a URL")):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(StorageError, match=re.escape(says)) as error:
            ArtifactStore("s3://bucket/runs")
        assert "hunter2" not in str(error.value) and "s3://bucket/runs" in str(error.value)
    # The setting s3fs uses is checked, by its name: the service's own endpoint wins over the generic one.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8333")
    ArtifactStore("s3://bucket/runs")  # AWS_ENDPOINT_URL (still ftp://) is not used
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", "s3.example")
    with pytest.raises(StorageError, match=re.escape("FSSPEC_S3_ENDPOINT_URL=s3.example is not an http(s)")):
        ArtifactStore("s3://bucket/runs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://[::1")
    for name in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")  # botocore then ignores AWS_ENDPOINT_URL
    ArtifactStore("s3://bucket/runs")


def test_server_repr_hides_secret(s3_server):
    assert s3_server.secret_key not in repr(s3_server)
    assert s3_server.env()["AWS_ENDPOINT_URL"] == s3_server.endpoint_url.rstrip("/")
    identity = json.loads((s3_server.data_dir / "s3.json").read_text())["identities"][0]
    assert identity["credentials"][0]["accessKey"] == s3_server.access_key
    assert all(port < 65536 for port in s3_server.ports.values()) and s3_server.process.poll() is None


def test_a_local_root_where_access_says_yes_but_nothing_can_be_made_is_refused(tmp_path: Path):
    # As root, access() calls /proc writable; the run then started and died in a Prefect traceback
    # at its first mkdir (an NFS export that squashes root behaves alike). Checked by making a folder.
    with pytest.raises(StorageError, match=r"/proc/smolflow-runs: cannot write in /proc \(.+\)\. Choose a folder"):
        ArtifactStore("/proc/smolflow-runs").check_access()
    writable = tmp_path / "runs"
    ArtifactStore(str(writable)).check_access()
    assert list(tmp_path.iterdir()) == []  # the check's folder went at once; the root is made by the run
