"""Fault test on a real S3 server: SeaweedFS is stopped in the middle of a run's uploads and
started again (same data directory, same ports). The run completes with every object intact,
and its manifest (the mark of a complete run) appears only after every other object."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from pathlib import Path

import boto3
import pytest

from scripts.s3_server import start, weed_binary
from tasks.pointers import read_pointer, set_pointer
from tasks.storage import ArtifactStore, completed_runs, verify_run, write_manifest

PART = 5 * 2**20  # S3's minimum part size: the weights go up as a 3-part multipart upload


def _local_run(path: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"seed": 1}\n',
        "model/config.json": b'{"hidden_size": 64}\n',
        "model/model.safetensors": os.urandom(2 * PART + 4321),
        **{f"samples/sample-{i:02d}.json": f'{{"i": {i}}}\n'.encode() for i in range(12)},
        "report/report.md": "# report\n".encode(),
    }
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return files


def test_run_completes_intact_across_a_server_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog):
    try:
        weed_binary()
    except RuntimeError as err:
        pytest.skip(str(err))
    data_dir, secret = tmp_path / "s3", secrets.token_urlsafe(24)
    server = start(data_dir, "fault-" + secrets.token_hex(4), secret)
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
        # No botocore retries: riding out the outage is up to the store's own backoff.
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=server.access_key, aws_secret_access_key=secret)
        client.create_bucket(Bucket="fault")
        files = _local_run(tmp_path / "local")
        root = "s3://fault/smolflow"
        store = ArtifactStore(root, part_size=PART, retry_delays=(0.5, 1, 2, 4, 8, 15))

        first_done, stopped, failure = threading.Event(), threading.Event(), []

        def run_uploads() -> None:  # what the flow does, in its order
            try:
                run = store.child("runs", "r1")
                run.write_bytes("config.json", files["config.json"])
                first_done.set()
                run.upload_dir(tmp_path / "local" / "model", "model")  # the stop lands about here
                stopped.wait(60)
                run.upload_dir(tmp_path / "local" / "samples", "samples")
                run.upload_dir(tmp_path / "local" / "report", "report")
                write_manifest(run.uri, {"run_id": "r1"})
                set_pointer(root, "smolflow-finetune", "latest", "r1")
            except BaseException as err:
                failure.append(err)

        caplog.set_level(logging.WARNING)
        uploader = threading.Thread(target=run_uploads)
        uploader.start()
        assert first_done.wait(60)
        server.stop()
        stopped.set()
        uploader.join(2)  # the uploader meets a dead server and backs off meanwhile
        assert uploader.is_alive() and not failure, failure
        server = start(data_dir, server.access_key, secret, ports=server.ports)
        uploader.join(120)
        assert not uploader.is_alive() and not failure, failure

        retries = [r.getMessage() for r in caplog.records if "failed (" in r.getMessage()]
        assert retries and "upload of" in retries[0], retries  # the outage was met and ridden out

        fresh = ArtifactStore(root)
        assert completed_runs(root) == ["r1"]
        run = fresh.child("runs", "r1")
        assert run.list_files() == sorted([*files, "manifest.json"])  # nothing half-written, nothing extra
        manifest = verify_run(run.uri)  # every stored object re-hashed against the manifest
        for entry in manifest["objects"]:
            assert entry["sha256"] == hashlib.sha256(files[entry["path"]]).hexdigest(), entry["path"]
        assert read_pointer(root, "smolflow-finetune", "latest")["run_id"] == "r1"

        listed = client.list_objects_v2(Bucket="fault", Prefix="smolflow/runs/r1/")["Contents"]
        written = {o["Key"].rsplit("runs/r1/", 1)[1]: o["LastModified"] for o in listed}
        assert all(written["manifest.json"] >= t for t in written.values())  # the manifest came last
        weights = client.head_object(Bucket="fault", Key="smolflow/runs/r1/model/model.safetensors")
        assert weights["ETag"].strip('"').endswith("-3")  # it did go up in parts
        assert secret not in caplog.text
    finally:
        server.stop()
