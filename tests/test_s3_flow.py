"""The whole flow with its artifacts on a real S3 server (SeaweedFS): run folder, manifest
hashes, and the `latest` pointer written after the manifest."""

from __future__ import annotations

from flows.finetune import finetune
from tasks.pointers import read_pointer
from tasks.storage import ArtifactStore, completed_runs, verify_run
from tests.conftest import tiny_run_config
from tests.test_flow import check_run_folder


def test_flow_end_to_end_on_s3(tiny_model_dir, s3_bucket, s3_server):
    root = s3_bucket + "/smolflow"
    summary = finetune(config=tiny_run_config(tiny_model_dir, root))

    run_uri = summary["run"]
    assert run_uri.startswith(root + "/runs/") and summary["manifest"] == run_uri + "/manifest.json"
    assert summary["model"] == run_uri + "/model"
    manifest = check_run_folder(run_uri)  # every expected object, hashes and versions in the manifest
    verify_run(run_uri)  # ... and every stored object re-hashed against it
    run_id = run_uri.rsplit("/", 1)[1]
    assert manifest["run_id"] == run_id and completed_runs(root) == [run_id]

    latest = read_pointer(root, "smolflow-finetune", "latest")
    assert latest["run_id"] == run_id and latest["run_uri"] == run_uri
    assert latest["manifest_sha256"] == ArtifactStore(run_uri).sha256("manifest.json")
    store = ArtifactStore(root)
    for path in store.list_files():  # no secret in any stored object
        assert s3_server.secret_key.encode() not in store.fs.cat(store.url(path)), path
