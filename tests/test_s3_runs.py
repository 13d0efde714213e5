"""The run layout on a real S3 server (SeaweedFS) and on a local directory: manifests, readers
that ignore incomplete runs, pointers, multipart uploads, manifest-checked downloads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import boto3
import pytest

from tasks.pointers import read_pointer, set_pointer
from tasks.storage import (
    ArtifactStore,
    IncompleteRunError,
    IntegrityError,
    completed_runs,
    download_verified,
    read_run,
    verify_run,
    write_manifest,
)

FLOW = "smolflow-finetune"


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/smolflow"


def _model_dir(path: Path, seed: int) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(f'{{"seed": {seed}}}')
    (path / "model.safetensors").write_bytes(hashlib.sha256(str(seed).encode()).digest() * 4096)
    return path


def _complete_run(root: str, run_id: str, model: Path) -> ArtifactStore:
    run = ArtifactStore(root).child("runs", run_id)
    run.write_json("config.json", {"run": run_id})
    run.upload_dir(model, "model")
    write_manifest(run.uri, {"run_id": run_id, "dataset": {"fingerprint": "d" * 64}})
    return run


def test_readers_ignore_incomplete_runs_and_pointers_name_complete_ones(root: str, tmp_path: Path):
    _complete_run(root, "r1", _model_dir(tmp_path / "m1", 1))
    half = ArtifactStore(root).child("runs", "r2")  # cut off before its manifest
    half.write_json("config.json", {"run": "r2"})
    half.upload_dir(_model_dir(tmp_path / "m2", 2), "model")

    assert completed_runs(root) == ["r1"]
    assert read_run(root, "r1")["dataset"]["fingerprint"] == "d" * 64
    with pytest.raises(IncompleteRunError, match="runs/r2/manifest.json does not exist: the run is incomplete"):
        read_run(root, "r2")
    with pytest.raises(IncompleteRunError):  # a pointer never names an incomplete run
        set_pointer(root, FLOW, "latest", "r2")
    assert read_pointer(root, FLOW, "latest") is None

    set_pointer(root, FLOW, "latest", "r1")
    pointer = read_pointer(root, FLOW, "latest")
    assert pointer["run_id"] == "r1" and pointer["run_uri"] == ArtifactStore(root).child("runs", "r1").uri
    assert pointer["manifest_sha256"] == ArtifactStore(pointer["run_uri"]).sha256("manifest.json")

    _complete_run(root, "r2", tmp_path / "m2")
    assert completed_runs(root) == ["r1", "r2"]
    set_pointer(root, FLOW, "latest", "r2")
    set_pointer(root, FLOW, "promoted", "r1")
    assert read_pointer(root, FLOW, "latest")["run_id"] == "r2"
    assert read_pointer(root, FLOW, "promoted")["run_id"] == "r1"
    # Pointer objects live beside the runs, one whole JSON object each.
    assert ArtifactStore(root).list_files("pointers") == [f"{FLOW}/latest.json", f"{FLOW}/promoted.json"]
    with pytest.raises(ValueError, match="flow_name 'a/b' must be a non-empty name without slashes"):
        set_pointer(root, "a/b", "latest", "r1")


def test_downloads_are_checked_against_the_manifest(root: str, tmp_path: Path):
    model = _model_dir(tmp_path / "m", 3)
    run = _complete_run(root, "r1", model)
    assert verify_run(run.uri)["run_id"] == "r1"
    out = download_verified(run.url("model"), tmp_path / "ok")
    assert (out / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()

    run.write_bytes("model/model.safetensors", b"damaged")  # the stored copy changes after the fact
    with pytest.raises(IntegrityError, match=r"model.safetensors: size/sha256 7/.*manifest says 131072/") as err:
        download_verified(run.url("model"), tmp_path / "bad")
    assert "Re-download, or re-run the flow" in str(err.value)
    with pytest.raises(IntegrityError, match="model/model.safetensors"):
        verify_run(run.uri)
    run.write_bytes("model/extra.bin", b"x")
    with pytest.raises(IntegrityError, match="extra.bin: not in the manifest"):
        download_verified(run.url("model"), tmp_path / "bad2")


def test_large_uploads_are_multipart_with_the_configured_part_size(s3_bucket: str, s3_server, tmp_path: Path):
    part = 5 * 2**20  # S3's minimum part size
    big = tmp_path / "src" / "weights.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(2 * part + 123))
    store = ArtifactStore(s3_bucket + "/smolflow", part_size=part)
    store.upload_dir(big.parent, "model")
    store.write_bytes("blob.bin", big.read_bytes())
    store.write_bytes("small.json", b"{}")

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
    bucket = s3_bucket.removeprefix("s3://")
    for key in ("smolflow/model/weights.bin", "smolflow/blob.bin"):
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # S3's mark of a 3-part upload
        assert head["ContentLength"] == big.stat().st_size
        assert store.sha256(key.removeprefix("smolflow/")) == hashlib.sha256(big.read_bytes()).hexdigest()
    assert "-" not in client.head_object(Bucket=bucket, Key="smolflow/small.json")["ETag"]


def test_local_writes_leave_no_partial_files(tmp_path: Path):
    store = ArtifactStore(str(tmp_path / "store"))
    store.write_json("pointers/f/latest.json", {"run_id": "a"})
    store.write_json("pointers/f/latest.json", {"run_id": "b"})
    assert store.read_json("pointers/f/latest.json") == {"run_id": "b"}
    assert store.list_files() == ["pointers/f/latest.json"]  # no temporary file left behind
