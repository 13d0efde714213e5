"""Prefect's task results and cache records on S3: a block saved by scripts/prefect_s3_storage.py,
and a second process (its own PREFECT_HOME, like a second machine) that gets a cache hit from
the first one's record in the bucket, through the tests' Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tasks.storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]

CHILD = '''
import sys
from prefect import flow, task
from prefect.cache_policies import INPUTS

@task(cache_policy=INPUTS, persist_result=True)
def square(x: int) -> int:
    return x * x

@flow
def once(x: int) -> None:
    state = square(x, return_state=True)
    print("STATE", state.name, state.result(), flush=True)

once(int(sys.argv[1]))
'''


def _env(tmp_path: Path, home: str, **extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT), **extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_cache_hit_from_a_second_process_through_s3(s3_bucket: str, s3_server, tmp_path: Path):
    name = f"results-{uuid.uuid4().hex[:8]}"
    saved = _run(["scripts/prefect_s3_storage.py", "--bucket", s3_bucket, "--folder", "prefect", "--name", name],
                 _env(tmp_path, "setup"))
    assert f"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/{name}" in saved.stdout
    assert s3_server.secret_key not in saved.stdout + saved.stderr

    (tmp_path / "child.py").write_text(CHILD)
    results = {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"s3-bucket/{name}"}
    first = _run([str(tmp_path / "child.py"), "7"], _env(tmp_path, "machine-a", **results))
    assert "STATE Completed 49" in first.stdout, first.stdout
    stored = ArtifactStore(s3_bucket).list_files("prefect")
    assert stored, "no result record in the bucket"
    second = _run([str(tmp_path / "child.py"), "7"], _env(tmp_path, "machine-b", **results))
    assert "STATE Cached 49" in second.stdout, second.stdout  # machine-b has no local results at all
    assert not any((tmp_path / "machine-b").rglob("storage/*"))
    assert s3_server.secret_key not in first.stdout + first.stderr + second.stdout + second.stderr


def test_the_script_names_an_unusable_bucket(s3_bucket: str, s3_server, tmp_path: Path):
    out = subprocess.run([sys.executable, "scripts/prefect_s3_storage.py", "--bucket", "no-such-bucket-x1"],
                         env=_env(tmp_path, "setup"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "cannot use bucket 'no-such-bucket-x1' at " + s3_server.endpoint_url in out.stderr
    assert s3_server.secret_key not in out.stdout + out.stderr



def test_smolflow_keeps_its_results_in_its_cache_unless_prefect_is_told_where(tmp_path: Path):
    """By default the flows' task results go under SMOLFLOW_CACHE (bounded; tests/test_flow.py checks a
    real run); where Prefect's settings name a place (a default storage block, as above, or a local
    storage path), that place keeps them."""
    code = "from tasks.caching import results_storage; print('STORAGE', results_storage())"
    env = _env(tmp_path, "home", SMOLFLOW_CACHE=str(tmp_path / "cache"))
    assert f"STORAGE {tmp_path / 'cache' / 'results'}\n" in _run(["-c", code], env).stdout
    for name, value in (("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK", "s3-bucket/shared-results"),
                        ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "mine"))):
        assert "STORAGE None\n" in _run(["-c", code], env | {name: value}).stdout, name  # Prefect's, as set
