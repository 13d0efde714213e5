"""Shared test setup: offline, one torch thread, a temporary Prefect server, tiny real models.

Tiny models are random-init Llamas with the real SmolLM2 tokenizer (taken from the built-in
GGUF), so every code path is the real one while a training step takes well under a second.
"""

import atexit
import contextlib
import os
import shutil
import tempfile

# Before prefect/transformers are imported anywhere: offline, quiet, isolated state.
_HOME = tempfile.mkdtemp(prefix="smolflow-tests-")
# Gone when the process that made it exits (its servers and workers are stopped by then); rmtree
# removes the cache's link to the shared models, not the models.
atexit.register(shutil.rmtree, _HOME, True)
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    TOKENIZERS_PARALLELISM="false",
    WANDB_SILENT="true",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    # As every smolflow process sets it (tasks/runtime.py ENV_DEFAULTS): a temporary server's first
    # start on a busy 2-core machine took over Prefect's 20 s default (a test's flow failed so).
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
    PREFECT_HOME=os.path.join(_HOME, "prefect"),
    # Each test process is a machine of its own for smolflow's machine-wide locks (tasks/locks.py),
    # so that pytest-xdist's workers train side by side, as their caches let them.
    SMOLFLOW_MACHINE_LOCK=os.path.basename(_HOME),
    # Test datasets and downloads go to a throwaway cache; the built-in model conversion is
    # shared with the user's cache so it happens once per machine, not once per test session.
    SMOLFLOW_CACHE=os.path.join(_HOME, "cache"),
    # A `smolflow serve` left running on this machine must not receive the tests' runs (flows/cli.py
    # joins a server it finds there); tests that want a server give PREFECT_API_URL.
    SMOLFLOW_LOCAL_SERVER="http://127.0.0.1:9/api",
    # W&B's service writes two debug logs per run into its cache folder (~/.cache/wandb/logs):
    # the tests' ~1,000 W&B runs a session put theirs here.
    WANDB_CACHE_DIR=os.path.join(_HOME, "wandb-cache"),
    # One torch thread in every process the tests start (a run's `torch_threads: null` takes it, as
    # torch does): 3 test workers already share 2 cores, and a subprocess on 2 threads beside them
    # oversubscribed them (its idle threads spin). A test that wants more threads says so.
    OMP_NUM_THREADS="1",
)
os.makedirs(os.path.join(_HOME, "cache"))
# Every temporary file of the tests and their subprocesses under _HOME, so it goes with it: wandb
# makes two folders at import and removes them at exit, which the tests' SIGKILLed processes skip
# (~20 folders in /tmp a run before).
os.makedirs(os.path.join(_HOME, "tmp"))
os.environ["TMPDIR"] = os.path.join(_HOME, "tmp")
tempfile.tempdir = None  # gettempdir() reads TMPDIR again
_SHARED_MODELS = os.path.expanduser("~/.cache/smolflow/models")
os.makedirs(_SHARED_MODELS, exist_ok=True)
os.symlink(_SHARED_MODELS, os.path.join(_HOME, "cache", "models"))
os.environ.pop("WANDB_API_KEY", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

pytest_plugins = ["tests.s3"]  # SeaweedFS fixtures: s3_server, s3_bucket


# The files that took longest in `make test --durations` (2026-12-04, Zen 3 VM), longest first:
# a scheduling hint only; a file missing here just starts with the other slow ones.
LONGEST_FILES = ("test_cli.py", "test_ray.py", "test_cli_eval.py", "test_training_lock.py", "test_e2e_real_model.py",
                 "test_fast_lm.py", "test_ray_stop.py",
                 "test_work_pool.py", "test_serve_crash.py", "test_deployments.py", "test_leftovers_killed.py",
                 "test_training_ddp.py", "test_stop_signals.py",
                 "test_lora_tokens.py", "test_validate_runtime.py")  # the last two: ~57 s and ~41 s (2026-12-05)


def pytest_collection_modifyitems(config, items):
    """Files holding a long test (marked `slow`) first, the longest of them first: `make test`
    spreads whole files over workers (pytest-xdist, `--dist loadfile`, so a module's server fixture
    starts once) in this order, so the long ones overlap from the start instead of one finishing
    alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[bool, int]:
        name = item.path.name
        return item.path not in slow_files, LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: otherwise collection order


_SHARED_SERVER = "SMOLFLOW_TEST_PREFECT_API_URL"
_PREFECT_DB = "SMOLFLOW_TEST_PREFECT_DB"  # a set-up Prefect database, copied by prefect_home()


def prefect_home(path: Path) -> Path:
    """`path` made a PREFECT_HOME holding a copy of the database of the tests' server as it first
    started: a server's first start in an empty home runs every migration of Prefect's database,
    ~9 CPU-seconds on this project's 2-core machines, and the tests start ~30 servers in homes of their own."""
    path.mkdir(parents=True, exist_ok=True)
    if (template := os.environ.get(_PREFECT_DB)) and not (path / "prefect.db").exists():
        shutil.copyfile(template, path / "prefect.db")
    return path


def pytest_configure(config):
    """Under pytest-xdist, the controller starts one temporary Prefect server for every worker: a
    server per worker cost each worker ~20 s of CPU to start plus its background services, on 2 cores."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        config._smolflow_prefect = _test_server()
        os.environ[_SHARED_SERVER] = config._smolflow_prefect.__enter__()  # the workers start after this
        from tasks.locks import ensure_limits

        ensure_limits()  # as `smolflow serve` does: workers creating them at once left a server traceback


def pytest_unconfigure(config):
    if harness := getattr(config, "_smolflow_prefect", None):
        harness.__exit__(None, None, None)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """The temporary Prefect server every test's flows and tasks report to."""
    if shared := os.environ.get(_SHARED_SERVER):
        with _api_url(shared):
            prefect_home(Path(os.environ["PREFECT_HOME"]))  # for the temporary servers of this worker's runs
            yield
    else:
        with _test_server():
            prefect_home(Path(os.environ["PREFECT_HOME"]))
            yield


@contextlib.contextmanager
def _api_url(url: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


@contextlib.contextmanager
def _test_server():
    """A real `prefect server start` on a free port in a throwaway home, started as `smolflow serve`
    starts it (deployments/local.py: leases on disk, dies with this process), its API URL set here.
    Not prefect_test_harness's server: that one is ephemeral, and an ephemeral server runs none of
    Prefect's services, the lease repossessor among them, so the training slot of a run that a test
    killed (SIGKILL: nothing gives it back) stayed taken, and every later training of the session
    waited on it for good (CI ran into its 90-minute limit so). Here its lease expires (LEASE_S)."""
    import socket

    from deployments.local import start_server, stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="prefect-server-", dir=_HOME))
    # No UI: the tests that look at Prefect's UI serve it themselves (tests/test_prefect_markdown.py).
    server = start_server(port, home=home, log=home / "server.log", timeout=120, env={"PREFECT_UI_ENABLED": "false"})
    try:
        if _PREFECT_DB not in os.environ:  # its database before any test wrote to it: prefect_home's copy
            import sqlite3

            template = Path(_HOME) / "prefect-template.db"
            with contextlib.closing(sqlite3.connect(home / "prefect.db")) as live, \
                    contextlib.closing(sqlite3.connect(template)) as copy:
                live.backup(copy)  # consistent while the server runs
            os.environ[_PREFECT_DB] = str(template)  # inherited by the xdist workers, which start after this
        with _api_url(f"http://127.0.0.1:{port}/api") as url:
            yield url
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all()  # what this process still has to send, before the server goes
            EventsWorker.drain_all()
    finally:
        stop(server)


@pytest.fixture(autouse=True)
def no_leaked_api_url():
    """A test must not leave PREFECT_API_URL in the environment: every later subprocess of the
    worker would report to the shared server, and a SIGKILLed one would hold its training slot
    until its lease expired (LEASE_S), stalling every later training that long."""
    yield
    assert "PREFECT_API_URL" not in os.environ, "this test left PREFECT_API_URL set in os.environ"


@pytest.fixture(autouse=True)
def no_leaked_run_settings():
    """A run's device/precision settings (SMOLFLOW_EXECUTION, tasks/device.py publish) end with it: one
    left behind changes how every later test of the worker loads models; and a run time limit
    (SMOLFLOW_RUN_TIMEOUT_HOURS, which `smolflow serve` defaults) would end every later run of the worker."""
    names = ("SMOLFLOW_EXECUTION", "SMOLFLOW_RUN_TIMEOUT_HOURS")
    before = {name: os.environ.get(name) for name in names}
    yield
    left = {name: os.environ.get(name) for name in names if os.environ.get(name) != before[name]}
    for name in left:
        os.environ.pop(name, None) if before[name] is None else os.environ.update({name: before[name]})
    if left:
        pytest.fail(f"this test left {', '.join(f'{k}={v!r}' for k, v in left.items())} in os.environ")


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from the GGUF once per machine."""
    from tasks import models

    return models.convert_builtin()


def _tiny_llama(tokenizer, path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(builtin_dir, tmp_path_factory) -> Path:
    """A 3M-parameter Llama with SmolLM2's tokenizer and its ChatML template."""
    from transformers import AutoTokenizer

    return _tiny_llama(AutoTokenizer.from_pretrained(builtin_dir), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_base_model_dir(builtin_dir, tmp_path_factory) -> Path:
    """The same tiny Llama without a chat template, like a base model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_dir)
    tokenizer.chat_template = None
    path = _tiny_llama(tokenizer, tmp_path_factory.mktemp("tiny-base"))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.fixture
def tiny_ref(tiny_model_dir):
    from tasks.models import resolve_model

    return resolve_model.fn(str(tiny_model_dir))


@pytest.fixture
def fixture_data():
    from tasks.config import DataConfig
    from tasks.data import load_chat_dataset

    return load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations"))


def tokens_of(model_ref, data, cfg, assistant_only: bool = False):
    """What tokenize_dataset gives train_sft: the data rendered with the model's template, cut to cfg.max_length."""
    from tasks.tokenization import tokenized_splits

    return tokenized_splits(model_ref, data, cfg.max_length, assistant_only)


def tiny_run_config(model_dir: Path, artifacts: str, **overrides):
    """A RunConfig for the whole flow on a tiny model: seconds, not minutes."""
    from tasks.config import RunConfig

    base = {
        "model": str(model_dir),
        "data": {"dataset": "fixture:everyday-conversations"},
        "training": {"max_steps": 3, "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "max_length": 256},
        "sampling": {"prompts": ["Hello! How are you?", "Any tips for a rainy day?"], "max_new_tokens": 8},
        "benchmarks": [{"name": "gsm8k", "limit": 2, "batch_size": 2}],
        "output": {"artifacts_uri": artifacts},
        "wandb": {"mode": "offline"},
        "judge": {"model": str(model_dir)},  # a tiny judge: its verdicts are noise, the code path is real
        "torch_threads": 1,
    }
    if overrides.get("judge", {}).get("enabled") is False:
        base["judge"] = {}  # judge settings with the judge off are refused (they would have no effect)
    for key, value in overrides.items():
        base[key] = base.get(key, {}) | value if isinstance(value, dict) else value
    return RunConfig.model_validate(base)
