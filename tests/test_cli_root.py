"""`smolflow runs`, `compare` and `gc` on a --root that holds no runs, with bad gc flags or a closed
stdout, and `eval --model` given a mistyped run id: one line and exit 2 (or a quiet end), through
the real installed command, as tests/test_cli.py runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from tests.test_cli import ROOT, SMOLFLOW, env, smolflow  # noqa: F401 -- env: the fixture

# Each command reading a root, with what it needs besides --root (gc only lists: --dry-run).
READERS = (["runs"], ["compare", "a", "b"], ["gc", "--dry-run"])


def _refused(out: subprocess.CompletedProcess, says: str) -> None:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and says in out.stderr, out.stderr[-2000:]


def _run(root, run_id: str, **status) -> None:
    """A run folder as the flows begin one: its config, and a status while it is being written."""
    folder = root / "runs" / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": run_id, "training": {"max_steps": 5}}))
    if status:
        (folder / "status.json").write_text(json.dumps(status))


def _own_cache(env, tmp_path) -> dict:  # noqa: F811 -- env: the fixture
    """gc also bounds SMOLFLOW_CACHE and W&B's logs: here, the test's own (empty) ones."""
    return env | {"SMOLFLOW_CACHE": str(tmp_path / "cache"), "WANDB_CACHE_DIR": str(tmp_path / "wandb")}


def test_a_root_with_another_scheme_is_refused_as_output_artifacts_uri_is(env, tmp_path):  # noqa: F811
    # Once an aiohttp DNS traceback (exit 1), where `validate --output.artifacts-uri http://x` said one line.
    for command in READERS:
        out = smolflow(_own_cache(env, tmp_path), *command, "--root", "http://x")
        _refused(out, f"smolflow {command[0]}: error: --root: unsupported scheme in 'http://x': "
                      "use a local path, file:// or s3://")


def test_a_root_that_is_missing_or_a_file_is_refused_and_an_empty_one_has_no_runs(env, tmp_path):  # noqa: F811
    # Once "no runs under /nonexistent", exit 0: a typo in --root looked like an empty root.
    missing, a_file, empty = tmp_path / "nonexistent", tmp_path / "run.yaml", tmp_path / "empty"
    a_file.write_text("model: auto\n")
    empty.mkdir()
    for command in READERS[:2]:
        _refused(smolflow(_own_cache(env, tmp_path), *command, "--root", str(missing)),
                 f"smolflow {command[0]}: error: --root: {missing} does not exist")
        _refused(smolflow(_own_cache(env, tmp_path), *command, "--root", str(a_file)),
                 f"--root: {a_file} is a file, not a folder")
    assert not missing.exists() and not (tmp_path / "cache").exists()  # nothing written
    # gc says so too, and still bounds the cache (`smolflow gc` from a folder with no runs yet)
    stale = tmp_path / "cache" / "tokenized" / "stale"
    stale.mkdir(parents=True)
    (stale / "data").write_bytes(b"x" * 4096)
    os.utime(stale / "data", (time.time() - 48 * 3600,) * 2)
    os.utime(stale, (time.time() - 48 * 3600,) * 2)
    out = smolflow(_own_cache(env, tmp_path) | {"SMOLFLOW_CACHE_MAX_GB": "0"}, "gc", "--root", str(missing))
    assert out.returncode == 0 and out.stderr.startswith(f"smolflow gc: note: --root: {missing} does not exist"), out.stderr
    assert "| tokenized/stale | delete |" in out.stdout and not stale.exists() and not missing.exists()
    listed = smolflow(env, "runs", "--root", str(empty))
    assert listed.returncode == 0 and listed.stdout == f"no runs under {empty}\n", listed.stderr[-2000:]


def test_a_missing_s3_bucket_is_refused_as_validate_refuses_it(env, s3_bucket, tmp_path):  # noqa: F811
    # Once "no runs under s3://nobucket" (exit 0), an empty gc table, and "no such run" for compare.
    here = _own_cache(dict(os.environ, PREFECT_API_URL=env["PREFECT_API_URL"], PYTHONPATH=str(ROOT)), tmp_path)
    missing = "s3://no-such-bucket-" + os.urandom(4).hex()
    for command in READERS:
        _refused(smolflow(here, *command, "--root", missing),
                 f"--root: S3 storage error for {missing}: bucket '{missing[5:]}' does not exist at AWS_ENDPOINT_URL=")
    listed = smolflow(here, "runs", "--root", s3_bucket + "/smolflow")  # the bucket exists: no runs yet
    assert listed.returncode == 0 and listed.stdout.startswith("no runs under"), listed.stderr[-2000:]


def test_a_closed_stdout_ends_the_listing_quietly(env, tmp_path):  # noqa: F811
    # `smolflow runs | head -1` and `compare A B | head` once ended in a BrokenPipeError traceback.
    root = tmp_path / "root"
    _run(root, "20261205-171128-gentle-panda")
    _run(root, "20261206-020000-brave-otter", state="running")
    # stdout block-buffered, as a pipe is by default: a short listing is written at the interpreter exit
    buffered = {k: v for k, v in _own_cache(env, tmp_path).items() if k != "PYTHONUNBUFFERED"}
    for command in (["runs"], ["runs", "--json"], ["compare", "20261205-171128-gentle-panda",
                                                   "20261206-020000-brave-otter"], ["gc", "--dry-run"]):
        read, write = os.pipe()
        os.close(read)  # the reader has gone before the first line: every write to stdout fails
        try:
            out = subprocess.run([str(SMOLFLOW), *command, "--root", str(root)], stdout=write, stderr=subprocess.PIPE,
                                 text=True, env=buffered, cwd=ROOT, timeout=300)
        finally:
            os.close(write)
        assert out.returncode == 128 + signal.SIGPIPE and out.stderr == "", (command, out.returncode, out.stderr[-2000:])


def test_gc_flags_refuse_what_output_keep_runs_and_keep_incomplete_hours_refuse(env, tmp_path):  # noqa: F811
    # `gc --keep-runs 0 --keep-incomplete-hours 0` deleted a run still being written.
    root = tmp_path / "root"
    _run(root, "20261206-020000-brave-otter", state="running")
    for flags, says in ((["--keep-runs", "0", "--keep-incomplete-hours", "0"],
                         "--keep-runs 0: input should be greater than or equal to 1, as for output.keep_runs; "
                         "give --keep-runs 1 or more"),
                        (["--keep-runs", "-3"], "--keep-runs -3: "),
                        (["--keep-incomplete-hours", "-1"], "--keep-incomplete-hours -1.0: input should be greater "
                         "than or equal to 0, as for output.keep_incomplete_hours")):
        _refused(smolflow(_own_cache(env, tmp_path), "gc", "--root", str(root), *flags), says)
    assert (root / "runs/20261206-020000-brave-otter/config.json").is_file()
    # What the config takes, gc takes: the run, written just now, may still be running and stays.
    kept = smolflow(_own_cache(env, tmp_path), "gc", "--root", str(root), "--keep-runs", "1", "--keep-incomplete-hours", "0")
    assert kept.returncode == 0 and (root / "runs/20261206-020000-brave-otter").is_dir(), kept.stderr[-2000:]


def test_eval_of_a_mistyped_run_id_says_no_such_run(env, tmp_path):  # noqa: F811
    # Once the hub's "not in the local Hugging Face cache" for a run id with a typo in it.
    root = tmp_path / "root"
    _run(root, "20261205-171128-gentle-panda")
    offline = env | {"HF_HUB_OFFLINE": "1"}
    for typo in ("20261205-xxxx", "eval-20261205-171128-gentle-pandaa"):
        out = smolflow(offline, "eval", "--model", typo, "--output.artifacts-uri", str(root))
        _refused(out, f"smolflow eval: error: model={typo!r}: no run {typo!r} under {root} (see `smolflow runs`")
        assert "a Hugging Face model is named org/name" in out.stderr
    assert sorted(os.listdir(root / "runs")) == ["20261205-171128-gentle-panda"]  # refused before any run folder


def test_gc_applies_the_retention_the_newest_run_was_configured_with(env, tmp_path):  # noqa: F811
    # A bare `smolflow gc` applied keep_runs=14 to a nightly that keeps 30, and its table called that
    # "output.keep_runs=14": the nightly's runs 15-30 would have gone, said to be by its own setting.
    root = tmp_path / "root"
    for night in range(1, 6):
        run_id = f"2026120{night}-020000-night"
        _run(root, run_id)
        folder = root / "runs" / run_id
        (folder / "config.json").write_text(json.dumps({"output": {"keep_runs": 3, "keep_incomplete_hours": 6}}))
        (folder / "manifest.json").write_text(json.dumps({"run_id": run_id}))
        for path in (folder, *folder.iterdir()):
            os.utime(path, (time.time() - (6 - night) * 86400,) * 2)

    def deleted(*flags) -> dict[str, str]:
        out = smolflow(_own_cache(env, tmp_path), "gc", "--dry-run", "--root", str(root), *flags)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines() if " | run | " in line]
        return {name: why for name, action, _, _, why in rows if action == "delete"}

    by_config = deleted()
    assert sorted(by_config) == ["20261201-020000-night", "20261202-020000-night"], by_config
    assert "beyond output.keep_runs of run 20261205-020000-night, the newest: 3" in by_config["20261201-020000-night"]
    by_flag = deleted("--keep-runs", "4")
    assert list(by_flag) == ["20261201-020000-night"] and "beyond --keep-runs: 4" in by_flag["20261201-020000-night"]


def test_the_read_commands_answer_without_importing_prefect(env, tmp_path):  # noqa: F811
    # `runs`, `compare` and `gc` imported Prefect through the task modules they read runs with, ~1.3 of
    # each call's ~2 CPU-seconds on this project's 2-core machines: its flows and tasks are not theirs.
    root = tmp_path / "root"
    _run(root, "a")
    (root / "runs" / "a" / "manifest.json").write_text(json.dumps({"run_id": "a"}))
    _run(root, "b", state="failed", error="ValueError: no")
    said = {}
    for command in (["runs", "--json"], ["compare", "a", "b", "--json"], ["gc", "--dry-run"]):
        out = smolflow(_own_cache(env, tmp_path) | {"PYTHONPROFILEIMPORTTIME": "1"}, *command, "--root", str(root))
        assert out.returncode == 0, out.stderr[-3000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
        assert "tasks.storage" in imported, command  # what reads the root: imported, and so listed
        assert "prefect" not in imported, command
        said[command[0]] = out.stdout
    # ... and each did its work
    assert {r["run_id"]: r["status"] for r in json.loads(said["runs"])} == {"a": "complete", "b": "failed"}
    assert json.loads(said["compare"])["status"] == {"a": "complete", "b": "failed"}
    assert "| a | keep | run | 0.0 | completed, 1 of the 14 newest" in said["gc"], said["gc"]
    assert "| b | keep | run | 0.0 | failed, last written" in said["gc"], said["gc"]
