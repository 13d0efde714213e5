"""`smolflow`, through the real installed command line: every subcommand, and user errors as one
message with exit code 2 (no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import prefect_home

ROOT = Path(__file__).resolve().parent.parent
SMOLFLOW = Path(sys.executable).parent / "smolflow"


def cli_env() -> dict[str, str]:
    """The test session's environment, pointed at the session's Prefect server (no temporary ones)."""
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def env():
    return cli_env()


def smolflow(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(SMOLFLOW), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_help_lists_every_subcommand(env):
    out = smolflow(env, "--help")
    assert out.returncode == 0
    for command in ("run", "eval", "validate", "runs", "compare", "promote", "serve", "gc", "arena"):
        assert f"    {command} " in out.stdout
    fields = smolflow(env, "run", "--help")
    assert fields.returncode == 0 and "--training.max-steps" in fields.stdout and "--output.artifacts-uri" in fields.stdout
    assert fields.stdout.startswith("usage: smolflow run [--config FILE] [--section.field VALUE ...]")
    assert "Settings: --config FILE, a YAML or JSON file" in fields.stdout
    # serve takes the same settings (the nightly's) except a fixed run id, and says what it reads from the environment
    served = smolflow(env, "serve", "--help").stdout
    assert "--config FILE" in served and "--training.max-steps" in served and "--output.keep-runs" in served
    assert "--output.run-id" not in served and "--output.run-id" in fields.stdout
    assert all(f"  {name} " in served for name in ("SMOLFLOW_NIGHTLY_CRON", "SMOLFLOW_TIMEZONE", "SMOLFLOW_RUN_TIMEOUT_HOURS"))
    arena = smolflow(env, "arena", "run", "--help")
    assert arena.returncode == 0 and "--last-runs" in arena.stdout
    # eval lists only what it takes: the settings it refuses (tests below) are not offered
    scoring = smolflow(env, "eval", "--help").stdout
    assert "--benchmarks" in scoring and "--judge.enabled" in scoring and "--output.keep-runs" in scoring
    assert not any(f in scoring for f in ("--training.", "--data.", "--template.", "--gate.", "--sampling.max-new-tokens",
                                          "--output.push-to-hub", "--wandb.log-model"))


def test_every_option_and_argument_says_what_it_is():
    import argparse

    from flows.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield f"{path} {action.dest}", action.help

    undocumented = [where for where, text in walk(build_parser(), "smolflow") if not text]
    assert not undocumented  # `smolflow compare --help` once listed bare run_a, run_b


def test_user_errors_name_file_line_and_field_and_exit_2(env, tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("training:\n  max_steps: 5\n  learning_rate: fast\n")
    out = smolflow(env, "run", f"--config={bad}", "--training.max-stepz", "3")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{bad}:3: training.learning_rate" in out.stderr
    assert "flag --training.max-stepz: training.max_stepz: unknown setting; did you mean 'max_steps'?" in out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [\n")
    out = smolflow(env, "validate", "--config", str(broken))
    assert out.returncode == 2 and f"{broken}:2: not valid YAML" in out.stderr and "Traceback" not in out.stderr
    out = smolflow(env, "run", "--benchmarks", '[{"name": "mmlu", "subsets": ["astrology"]}]')
    assert out.returncode == 2 and "benchmarks[0].subsets: unknown ['astrology']" in out.stderr


def test_an_unreachable_hub_fails_before_the_flow_with_the_fix(env, tmp_path):
    """Online (HF_HUB_OFFLINE=0) on a machine that cannot reach the hub: one message naming what
    needs it and the offline switch, within seconds, before Prefect; not tracebacks from the flow."""
    online = env | {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    root = tmp_path / "runs"
    out = smolflow(online, "run", "--output.artifacts-uri", str(root))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert ("model='auto', data.dataset='auto', benchmarks[0] (gsm8k) data='auto' need the Hugging Face hub, "
            "but http://127.0.0.1:9 is unreachable") in out.stderr
    assert "set HF_HUB_OFFLINE=1" in out.stderr
    assert "Beginning flow run" not in out.stdout + out.stderr and not root.exists()
    out = smolflow(online, "eval", "--model", "HuggingFaceTB/SmolLM2-360M", "--judge.enabled", "false",
                   "--benchmarks", '[{"name": "gsm8k", "data": "fixture"}]', "--output.artifacts-uri", str(root))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "model='HuggingFaceTB/SmolLM2-360M' needs the Hugging Face hub" in out.stderr and not root.exists()
    local = ["--model", "builtin:smollm2-135m-instruct", "--data.dataset", "fixture:everyday-conversations",
             "--benchmarks", '[{"name": "gsm8k", "data": "fixture"}]']
    out = smolflow(online, "run", *local, "--output.push-to-hub", "me/smol-tuned", "--output.artifacts-uri", str(root))
    assert out.returncode == 2 and "output.push_to_hub='me/smol-tuned' needs the Hugging Face hub" in out.stderr
    assert not root.exists()  # not an hour of training, then a failed push
    # Nothing to fetch (the built-in model, the fixtures): the hub is never asked
    out = smolflow(online, "validate", *local)
    assert out.returncode == 0 and "hub" not in out.stderr, out.stderr[-2000:]


def test_a_hub_error_is_retried_then_the_command_ends_in_one_line(env, tmp_path):
    """The hub answers, but with 500s: the check before the flow passes (it is reachable), the
    model's task retries the server error, then the run fails and the command says so in one line
    with exit 1, under Prefect's log of the failure (not a second Python traceback)."""
    import http.server
    import threading

    class Failing(http.server.BaseHTTPRequestHandler):
        def answer(self):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    online = env | {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                    "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
    try:
        out = smolflow(online, "run", "--data.dataset", "fixture:everyday-conversations", "--benchmarks",
                       '[{"name": "gsm8k", "data": "fixture"}]', "--output.artifacts-uri", str(tmp_path / "runs"))
    finally:
        server.shutdown()
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.count("Task run 'resolve_model") >= 3 and "Retry 2/2" in out.stderr  # 3 attempts
    last = out.stderr.rstrip().splitlines()
    error = next(line for line in last if line.startswith("smolflow run: error:"))
    assert "the smolflow-finetune flow run failed: ConnectionError" in error and "500" in out.stderr
    assert "Traceback" not in out.stderr[out.stderr.index("smolflow run: error:"):]


def test_bad_data_and_missing_model_fail_before_the_flow_starts(env, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
    (data / "train.jsonl").write_text(good + "\n" + '{"messages": [{"role": "assistant", "content": "alone"}]}\n')
    (data / "test.jsonl").write_text(good + "\n")
    root = tmp_path / "runs"
    out = smolflow(env, "run", "--data.dataset", str(data), "--output.artifacts-uri", str(root))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"{data}/train.jsonl:2: no user turn" in out.stderr
    assert "Beginning flow run" not in out.stdout + out.stderr and not root.exists()  # no flow, nothing written
    out = smolflow(env, "run", "--model", str(tmp_path / "no-model"), "--output.artifacts-uri", str(root))
    assert out.returncode == 2 and "not a model directory" in out.stderr and "Traceback" not in out.stderr
    assert not root.exists()


def test_run_and_eval_join_a_running_server_instead_of_starting_one(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import join_running_server

    running = PREFECT_API_URL.value()  # the session's real server, as `smolflow serve` would be
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        monkeypatch.setenv("PREFECT_API_URL", "set")  # so that monkeypatch unsets what the join sets
        monkeypatch.delenv("PREFECT_API_URL")
        with join_running_server("http://127.0.0.1:9/api") as joined:  # nothing answers: a temporary server
            assert joined is None and PREFECT_API_URL.value() is None and "PREFECT_API_URL" not in os.environ
        with join_running_server(running) as joined:
            # In Prefect's settings (read once, at its import), not only in the environment.
            assert joined == running and PREFECT_API_URL.value() == running and os.environ["PREFECT_API_URL"] == running
    # A configured server is never replaced.
    with join_running_server("http://127.0.0.1:9/api") as joined:
        assert joined is None and PREFECT_API_URL.value() == running


def test_dashes_and_underscores_both_set_a_field():
    from tasks.config_args import parse_config

    a = parse_config(["--training.max-steps", "7", "--data.max_train_rows=3"])
    b = parse_config(["--training.max_steps=7", "--data.max-train-rows", "3"])
    assert a == b and a.training.max_steps == 7 and a.data.max_train_rows == 3


def test_validate_resolves_autos_lists_tasks_and_fails_on_missing_data(env, tmp_path):
    out = smolflow(env, "validate", "--judge.enabled", "false")
    assert out.returncode == 0, out.stderr
    shown = json.loads(json.dumps(__import__("yaml").safe_load(out.stdout)))
    assert shown["resolved"]["model"] == "builtin:smollm2-135m-instruct"
    assert shown["resolved"]["data.dataset"] == "fixture:everyday-conversations"
    assert "hand-written items" in shown["resolved"]["benchmarks[0].data"]
    # the device and precision the run will use, decided here as the run decides (tasks/device.py)
    from tasks.config import ExecutionConfig
    from tasks.device import resolve

    placement = resolve(ExecutionConfig())
    assert shown["resolved"]["execution.device"] == placement.device
    assert shown["resolved"]["execution.precision"].startswith(f"{placement.precision} (")
    assert "benchmark-gsm8k (tuned)" in shown["tasks"] and "train_sft" in shown["tasks"]
    missing = smolflow(env, "validate", "--data.dataset", str(tmp_path / "nope"), "--model", str(tmp_path))
    assert missing.returncode == 2
    assert "data: flag --data.dataset: data.dataset=" in missing.stderr and "no such file or directory" in missing.stderr
    assert f"model: model={str(tmp_path)!r}: not a model directory" in missing.stderr


def test_validate_is_quiet_a_bad_json_line_is_one_problem_line(env, tmp_path):
    """No datasets bars, and no datasets ERROR lines for a line smolflow reads and names itself."""
    good = '{"messages": [{"role": "user", "content": "hi %d"}, {"role": "assistant", "content": "hello"}]}'
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([good % 1, "not json", good % 2, good % 3, good % 4]) + "\n")
    out = smolflow(env, "validate", "--judge.enabled", "false", "--data.dataset", str(data), "--data.test-size", "0.2")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"smolflow validate: data: 1 bad row(s) in split 'train': {data}:2: not valid JSON (Expecting value at column 1). "
        "Fix or remove these rows, or set data.bad_rows='drop' to train without them.", "1 problem(s)"]


def test_an_unusable_s3_root_is_one_line_before_anything_starts(env, s3_bucket, s3_server, monkeypatch):
    # Once: `run` started the flow and failed at its first write (exit 1, a traceback in the log);
    # `validate` said OK; `runs`/`compare`/`gc` ended in a traceback.
    here = dict(os.environ, PREFECT_API_URL=env["PREFECT_API_URL"], PYTHONPATH=str(ROOT))  # the server's AWS_*
    missing = "s3://no-such-bucket-" + os.urandom(4).hex() + "/smolflow"
    out = smolflow(here, "run", "--output.artifacts-uri", missing)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (f"smolflow run: error: flag --output.artifacts-uri: output.artifacts_uri: S3 storage error for {missing}: "
            f"bucket '{missing[5:].split('/')[0]}' does not exist") in out.stderr
    assert "Beginning flow run" not in out.stdout + out.stderr
    assert "artifacts: flag --output.artifacts-uri" in smolflow(here, "validate", "--output.artifacts-uri", missing).stderr
    wrong = here | {"AWS_SECRET_ACCESS_KEY": "wrong-" + os.urandom(8).hex()}
    for args in (["runs", "--root", s3_bucket], ["gc", "--root", s3_bucket, "--dry-run"],
                 ["run", "--output.artifacts-uri", s3_bucket + "/smolflow"],
                 ["validate", "--output.artifacts-uri", s3_bucket]):  # a bucket alone: it said "does not exist"
        out = smolflow(wrong, *args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "access denied by AWS_ENDPOINT_URL=" in out.stderr and wrong["AWS_SECRET_ACCESS_KEY"] not in out.stderr
    with_password = here | {"AWS_ENDPOINT_URL": here["AWS_ENDPOINT_URL"].replace("://", "://admin:hunter2@")}
    out = smolflow(with_password, "runs", "--root", s3_bucket)  # once a traceback, after retries
    assert out.returncode == 2 and "carries credentials" in out.stderr and "hunter2" not in out.stderr, out.stderr[-2000:]
    assert smolflow(here, "runs", "--root", s3_bucket).returncode == 0  # the right credentials: an empty listing


def test_a_local_root_that_cannot_be_written_is_one_line_before_anything_starts(env, tmp_path):
    # `validate` said OK and `run` started the flow, then failed ~30 s in (EROFS at its first write).
    file_root = tmp_path / "a-file"  # a file where the root's folder must be: refused for anyone
    file_root.write_text("")
    out = smolflow(env, "validate", "--output.artifacts-uri", str(file_root / "runs"))
    assert out.returncode == 2 and f"{file_root} is a file, not a folder" in out.stderr, out.stderr[-2000:]
    closed = tmp_path / "closed"
    closed.mkdir()
    if os.geteuid() == 0:  # root writes through any mode: a read-only file system, in a mount namespace of its own
        assert shutil.which("unshare"), "util-linux `unshare` is needed to mount a read-only tmpfs (apt-get install util-linux)"
        wrap, why = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                     f'mount -t tmpfs -o ro none {closed} && exec "$@"', "sh"], "a read-only file system"
    else:  # an ordinary user: a folder it may not write
        closed.chmod(0o555)
        wrap, why = [], "no write permission for this user"
    for command in ("validate", "run"):
        started = time.monotonic()
        out = subprocess.run([*wrap, str(SMOLFLOW), command, "--output.artifacts-uri", f"{closed}/smolflow-runs"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"cannot write in {closed} ({why})" in out.stderr, out.stderr[-2000:]
        assert "Beginning flow run" not in out.stdout + out.stderr and time.monotonic() - started < 60


def test_humaneval_without_a_sandbox_is_refused_before_training(env, tmp_path):
    # As a user without root, a run trained (hours at full size), then failed at HumanEval's first item.
    # No util-linux `unshare` here (SMOLFLOW_UNSHARE names a missing one): the same refusal, as root too.
    nowhere = env | {"SMOLFLOW_UNSHARE": str(tmp_path / "no-unshare"), "HF_HUB_OFFLINE": "1"}
    humaneval = ["--benchmarks", '[{"name": "humaneval", "limit": 1}]', "--output.artifacts-uri", str(tmp_path)]
    started = time.monotonic()
    out = smolflow(nowhere, "run", *humaneval)
    assert out.returncode == 2 and time.monotonic() - started < 60, out.stderr[-2000:]
    assert "flag --benchmarks: benchmarks[0] (humaneval): the HumanEval sandbox needs" in out.stderr
    assert "SMOLFLOW_SANDBOX=weak" in out.stderr and not (tmp_path / "runs").exists()
    assert "cross-checks: flag --benchmarks: benchmarks[0] (humaneval)" in smolflow(nowhere, "validate", *humaneval).stderr
    weak = smolflow(nowhere | {"SMOLFLOW_SANDBOX": "weak"}, "validate", *humaneval)  # chosen: accepted
    assert weak.returncode == 0, weak.stderr[-2000:]


def test_an_unreachable_judge_endpoint_is_said_before_training(env, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    judge = ["--judge.backend", "openai", "--judge.base-url", nowhere, "--judge.model", "m"]
    started = time.monotonic()
    out = smolflow(env, "run", *judge, "--output.artifacts-uri", str(tmp_path))
    assert out.returncode == 2 and time.monotonic() - started < 60, out.stderr[-2000:]  # it once trained first
    assert f"flag --judge.base-url: judge.base_url='{nowhere}': no answer (ConnectError" in out.stderr
    assert "Beginning flow run" not in out.stdout + out.stderr and not (tmp_path / "runs").exists()
    assert "judge: flag --judge.base-url" in smolflow(env, "validate", *judge).stderr
    arena = smolflow(env, "arena", "run", *judge, "--artifacts-uri", str(tmp_path))
    assert arena.returncode == 2 and f"judge.base_url='{nowhere}': no answer" in arena.stderr, arena.stderr[-2000:]


def test_a_missing_local_judge_model_is_said_before_training(env, tmp_path):
    # passed `validate`, then trained and failed at the judge naming `model` (the run's own setting)
    missing = ["--judge.model", str(tmp_path / "no-judge"), "--output.artifacts-uri", str(tmp_path / "runs")]
    started = time.monotonic()
    out = smolflow(env | {"HF_HUB_OFFLINE": "1"}, "run", *missing)
    assert out.returncode == 2 and time.monotonic() - started < 60, out.stderr[-2000:]
    assert f"flag --judge.model: judge.model='{tmp_path / 'no-judge'}': not a model directory" in out.stderr
    assert "Beginning flow run" not in out.stdout + out.stderr and not (tmp_path / "runs").exists()
    assert "cross-checks: flag --judge.model: judge.model=" in smolflow(env | {"HF_HUB_OFFLINE": "1"}, "validate",
                                                                       *missing).stderr


def test_a_completed_runs_id_is_refused_not_written_over(env, tmp_path):
    """A run id resumes a run that did not complete; given a completed run's id, `run` wrote into its
    folder: files the new run did not write (the old judge's pairs) went into the new manifest."""
    from tasks.storage import ArtifactStore, write_manifest

    root = tmp_path / "runs"
    write_manifest(ArtifactStore(str(root)).child("runs", "done").uri, {"run_id": "done"})
    before = sorted(p.name for p in (root / "runs" / "done").iterdir())
    for command in ("run", "validate", "eval"):
        out = smolflow(env | {"HF_HUB_OFFLINE": "1"}, command, "--output.run-id", "done", "--output.artifacts-uri",
                       str(root), *(["--model", "builtin:smollm2-135m-instruct"] if command == "eval" else []))
        assert out.returncode == 2, out.stderr[-2000:]
        assert (f"flag --output.run-id: output.run_id: run 'done' under {root} has completed (its manifest.json is "
                "written); a run id resumes only a run that did not complete") in out.stderr, out.stderr[-2000:]
    assert sorted(p.name for p in (root / "runs" / "done").iterdir()) == before


def test_a_ray_cluster_that_does_not_answer_is_said_before_training(env, tmp_path):
    from tasks.config import ExecutionConfig
    from tasks.reachable import check_ray_address

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_ray_address(ExecutionConfig(task_runner="ray", ray_address=f"ray://127.0.0.1:{listening.getsockname()[1]}"))
    port = _free_port()
    out = smolflow(env, "run", "--execution.task-runner", "ray", "--execution.ray-address", f"127.0.0.1:{port}",
                   "--output.artifacts-uri", str(tmp_path))
    assert out.returncode == 2, out.stderr[-2000:]  # it once trained, then failed joining the cluster
    assert (f"flag --execution.ray-address: execution.ray_address='127.0.0.1:{port}': nothing answers at "
            f"127.0.0.1:{port}") in out.stderr and "Beginning flow run" not in out.stdout + out.stderr
    # `auto` with no cluster started here: prefect-ray's bare ray.init() quietly started one (and
    # left its session folder); a value that is no address at all passed too.
    here = env | {"RAY_TMPDIR": str(tmp_path / "ray-tmp")}
    here.pop("RAY_ADDRESS", None)
    for address, said in (("auto", "execution.ray_address='auto': no Ray cluster was started on this machine"),
                          ("foo", "execution.ray_address='foo': not a Ray address; use host:port")):
        out = smolflow(here, "validate", "--execution.task-runner", "ray", "--execution.ray-address", address,
                       "--judge.enabled", "false")
        assert out.returncode == 2 and said in out.stderr, out.stderr[-2000:]


def test_a_device_this_machine_lacks_is_a_user_error_before_the_flow(env, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for command in ("run", "validate"):
        out = smolflow(env, command, "--execution.device", "cuda", "--output.artifacts-uri", str(tmp_path))
        assert out.returncode == 2, out.stderr[-2000:]
        assert "flag --execution.device: execution.device: 'cuda', but no CUDA device is visible here" in out.stderr
        assert "Beginning flow run" not in out.stdout + out.stderr  # it once failed the flow (exit 1), validate said OK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_refuses_bad_nightly_settings_before_anything_starts(env, tmp_path):
    """`smolflow serve`'s settings are the nightly's: a bad one would fail every night; a fixed
    run_id would make every night resume one run. Both refused at once, naming the flag."""
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    for flags, said in ((["--training.max-steps", "many"], "flag --training.max-steps: training.max_steps:"),
                        (["--output.run-id", "nightly"], "flag --output.run-id: output.run_id: served runs get a new run id"),
                        (["--arena.max-battles", "many"], "flag --arena.max-battles: arena.max_battles: Input should be"),
                        (["--arena.artifacts-uri", "elsewhere"], "flag --arena.artifacts-uri: arena.artifacts_uri: the "
                                                                 "arena reads the nightly's runs")):
        out = subprocess.run([str(SMOLFLOW), "serve", "--port", str(_free_port()), *flags], capture_output=True,
                             text=True, timeout=120, env=env, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.startswith(f"smolflow serve: error: {said}"), out.stderr[-2000:]
        assert "Traceback" not in out.stderr


def test_serve_refuses_a_bad_schedule_before_anything_starts(env, tmp_path):
    """SMOLFLOW_NIGHTLY_CRON and SMOLFLOW_TIMEZONE: Prefect's own check ended the serve process in a
    traceback, after the server had started. One line naming the variable, exit 2, no server."""
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    for name, value, said in (("SMOLFLOW_NIGHTLY_CRON", "0 25 * * *", "is not a cron schedule; set five fields"),
                              ("SMOLFLOW_TIMEZONE", "Europe/Berln", "is not an IANA time zone")):
        port = _free_port()
        out = subprocess.run([str(SMOLFLOW), "serve", "--port", str(port)], capture_output=True, text=True,
                             timeout=120, env=dict(env, **{name: value}), cwd=tmp_path)
        assert out.returncode == 2 and out.stderr == f"error: {name}={value!r} {said}" + out.stderr.split(said)[1]
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # no server was started
    assert not list(tmp_path.iterdir())


def test_serve_refuses_a_folder_whose_flows_package_served_runs_would_import(env, tmp_path):
    """Served runs run in the folder `smolflow serve` starts in (their ./smolflow-runs is there), and
    Prefect imports the flow with that folder first on sys.path: a Prefect project's own `flows`
    package crashed every run. Refused before anything starts, naming the file and the way out."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("", encoding="utf-8")
    port = _free_port()
    out = subprocess.run([str(SMOLFLOW), "serve", "--port", str(port)], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in env.items() if k != "PREFECT_API_URL"}, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    found = tmp_path / "flows" / "__init__.py"
    assert out.stderr.startswith(f"error: {found} would be imported instead of smolflow's own 'flows'")
    assert "Start it from another folder" in out.stderr and "Traceback" not in out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # no server was started


@pytest.mark.slow
def test_serve_starts_a_server_with_both_deployments_and_stops_on_sigterm(env, tmp_path):
    port = _free_port()
    serve_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(prefect_home(tmp_path / "home"))}
    proc = subprocess.Popen([str(SMOLFLOW), "serve", "--port", str(port)], env=serve_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        names, deadline = set(), time.monotonic() + 240
        while time.monotonic() < deadline and len(names) < 2:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/deployments/filter", data=b"{}",
                                             headers={"Content-Type": "application/json"}, method="POST")
                with urllib.request.urlopen(req, timeout=5) as r:
                    names = {d["name"] for d in json.loads(r.read())}
            except OSError:
                pass
            time.sleep(1)
        assert {"nightly", "on-demand"} <= names
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
