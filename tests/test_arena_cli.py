"""`smolflow arena run` / `arena serve` refuse bad input in one line, exit 2, before any Prefect
server, flow run or listening socket: the real command in its own process, as a user runs it."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOLFLOW = str(Path(sys.executable).parent / "smolflow")


def smolflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SMOLFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The whole of stderr: one line (under argparse's usage line for a flag it refuses), exit 2,
    nothing on stdout (no URL, no Prefect server, no traceback)."""
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("usage: ")]
    assert done.stdout == "" and len(lines) == 1, done.stdout + done.stderr
    return done.stderr


@pytest.mark.parametrize("lines, expected", [(None, "missing.jsonl is not a file"),
                                             ('{"instruction": "hi"}\nnot json\n', "bad.jsonl line 2")])
def test_arena_run_checks_the_prompts_file_before_the_flow(tmp_path, lines, expected):
    prompts = tmp_path / ("missing.jsonl" if lines is None else "bad.jsonl")
    if lines is not None:
        prompts.write_text(lines)
    done = smolflow("arena", "run", "--prompts", str(prompts), "--judge.enabled", "false",
                    "--artifacts-uri", str(tmp_path / "runs"), cwd=tmp_path)
    assert expected in one_line_error(done)
    assert not (tmp_path / "runs").exists()  # nothing written: no flow ran


def test_arena_run_checks_each_listed_model_by_index(tmp_path):
    done = smolflow("arena", "run", "--models", '["builtin:smollm2-135m-instruct", "/not/a/model/dir"]',
                    "--judge.enabled", "false", "--artifacts-uri", str(tmp_path / "runs"), cwd=tmp_path)
    assert "models[1]='/not/a/model/dir'" in one_line_error(done)
    assert not (tmp_path / "runs").exists()


def test_arena_serve_refuses_an_impossible_port_at_parsing(tmp_path):
    for port in ("99999", "abc"):  # one line, as serve's --port says it (argparse's usage line was above it)
        done = smolflow("arena", "serve", "--root", str(tmp_path), "--port", port, cwd=tmp_path)
        assert one_line_error(done) == (f"smolflow arena serve: error: argument --port: '{port}' is not a port: "
                                        "give a number from 1 to 65535\n")


def test_arena_serve_refuses_a_busy_port_before_printing_the_url(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = smolflow("arena", "serve", "--root", str(tmp_path), "--port", str(port), cwd=tmp_path)
    assert f"port {port}" in one_line_error(done) and "--port" in done.stderr


def test_arena_run_refuses_wandb_log_model(tmp_path):
    # The arena trains no model: wandb.log_model (RunConfig's "upload the tuned model") would do nothing.
    done = smolflow("arena", "run", "--wandb.log-model", "true", "--judge.enabled", "false",
                    "--artifacts-uri", str(tmp_path / "runs"), cwd=tmp_path)
    assert "wandb.log_model" in one_line_error(done)
    assert not (tmp_path / "runs").exists()
