"""What a run reaches outside this process answers now: the Hugging Face hub, the artifact store
(S3), a Ray cluster, and (tasks/judge_backends.py) a judge's endpoint. The `smolflow` command asks
once before a run starts, so a wrong address or credential is one line naming the setting within
seconds, not a failure after an hour of training. A served run asks nothing: its tasks and its
store's writes retry the network (a nightly must survive a short outage), and a setting that is
wrong for good (credentials, a missing bucket) fails its first write at once. W&B is the exception
both ways: `wandb.mode: auto` asks its host in every run (served ones too) and falls back to offline
files when it does not answer (tasks/tracking.py), and `online` is refused up front without a key
or a host that answers.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from tasks.config import ExecutionConfig, RunConfig
from tasks.config_base import ConfigError
from tasks.runtime import redact_url


def check_reachable(config: RunConfig, training: bool = True) -> None:
    """Everything below, in one call: `smolflow run` (training) and `smolflow eval`."""
    from tasks.judge_backends import check_endpoint

    check_hub_reachable(config, training)
    check_store(config.output.artifacts_uri)
    check_endpoint(config.judge)
    check_ray_address(config.execution)
    check_wandb(config.wandb)


def check_ray_address(execution: ExecutionConfig, timeout: float = 5.0) -> None:
    """A cluster named host:port by execution.ray_address accepts a connection: said before training,
    not when the benchmarks start on Ray. 'auto' is the cluster `ray start` left on this machine (or
    RAY_ADDRESS): without one, prefect-ray's bare ray.init() would quietly start a cluster instead."""
    address = execution.ray_address
    if execution.task_runner != "ray" or not address:
        return
    if address == "auto":
        from ray._private.utils import read_ray_address  # what ray.init("auto") reads: RAY_TMPDIR's ray_current_cluster

        address = os.environ.get("RAY_ADDRESS") or read_ray_address()
        if not address:
            raise ConfigError("execution.ray_address='auto': no Ray cluster was started on this machine (`ray start "
                              "--head`) and RAY_ADDRESS is not set; start one, give its address, or remove "
                              "execution.ray_address for a cluster of the run's own")
    if "://" not in address and ":" not in address:
        raise ConfigError(f"execution.ray_address={address!r}: not a Ray address; use host:port, ray://host:10001 "
                          "or auto")
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not (host and port.isdigit()):
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"execution.ray_address={address!r}: nothing answers at {host}:{port} "
                          f"({err.strerror or err}); start the cluster (`ray start --head`) or fix the address") from None


def check_store(uri: str) -> None:
    """The artifact root can be written now (S3: credentials, endpoint, bucket); ConfigError naming
    output.artifacts_uri, before any run folder, model or data is touched."""
    from tasks.storage import ArtifactStore, StorageError

    try:
        ArtifactStore(uri).check_access()
    except StorageError as err:
        raise ConfigError(f"output.artifacts_uri: {err}") from None


def _hub_model_to_fetch(source: str) -> bool:
    """Whether `source` is a hub id whose files are not in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    from tasks.models import resolve_source

    concrete = resolve_source(source)
    if "/" not in concrete or concrete.startswith((".", "/", "~")) or Path(concrete).expanduser().exists():
        return False  # builtin:, a local folder, or an earlier run's id (smolflow eval)
    return not isinstance(try_to_load_from_cache(concrete, "config.json"), str)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT) cannot be reached now, or None when it answers at all."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered: reachable (the request's own status does not matter)
    except (urllib.error.URLError, OSError) as err:  # DNS, refused, timeout
        # HF_ENDPOINT may be a mirror behind basic auth: its user:password@ stays out of the message
        return f"{redact_url(constants.ENDPOINT)} is unreachable ({getattr(err, 'reason', err)})"
    return None


def check_hub_reachable(config: RunConfig, training: bool = True) -> None:
    """Online, with something to fetch from the hub (a model not in the cache, hub data): one quick
    request, so a machine without a network fails here in seconds with the fix, not minutes later
    in the flow with tracebacks. Only the `smolflow` command asks: a served run's tasks retry network
    failures instead (a nightly must survive a short outage)."""
    from tasks.benchmarks import REGISTRY
    from tasks.benchmarks.base import LmEvalBenchmark
    from tasks.runtime import hub_offline

    if hub_offline():
        return
    fetches = [f"model={config.model!r}"] if _hub_model_to_fetch(config.model) else []
    if training and not data_here(config.data.dataset):
        fetches.append(f"data.dataset={config.data.dataset!r}")
    if not training and config.judge.enabled and config.judge.reference == "base" and _hub_model_to_fetch("auto"):
        fetches.append("judge.reference='base' (the default model, 'auto')")
    for i, b in enumerate(config.benchmarks):
        try:
            hub_data = isinstance(REGISTRY[b.name], LmEvalBenchmark) and REGISTRY[b.name].local_source(b) is None
        except ValueError:  # a missing local path: the benchmark check names it
            hub_data = False
        if hub_data:
            fetches.append(f"benchmarks[{i}] ({b.name}) data={b.data!r}")
    # judge.model 'auto' is the built-in model, online too (tasks/judge_backends.py)
    if config.judge.enabled and config.judge.backend == "local" and config.judge.model != "auto" \
            and _hub_model_to_fetch(config.judge.model):
        fetches.append(f"judge.model={config.judge.model!r}")
    if training and config.output.push_to_hub:
        fetches.append(f"output.push_to_hub={config.output.push_to_hub!r}")
    if fetches and (why := hub_unreachable()):
        raise ConfigError(
            f"{', '.join(fetches)} {'needs' if len(fetches) == 1 else 'need'} the Hugging Face hub, but {why}. "
            "Offline, set HF_HUB_OFFLINE=1 (`make run` does): 'auto' then means the built-in SmolLM2-135M-Instruct "
            "and the shipped fixtures, and hub ids are read from the local cache; or give local paths")


def data_here(source: str) -> bool:
    """Whether data.dataset names local data (a fixture, a path) rather than a hub dataset."""
    from tasks.data import FIXTURE_PREFIX, names_a_path

    return source.startswith(FIXTURE_PREFIX) or names_a_path(source) or Path(source).expanduser().exists()


# ---- Weights & Biases --------------------------------------------------------------------------

WANDB_DEFAULT_URL = "https://api.wandb.ai"
WANDB_PROBE_S = 3.0  # the whole probe, name lookup included: a run without a network waits no longer
_WANDB_PROBE_TTL_S = 120.0  # one answer serves a run's checks, its resolved.json and its wandb.init
_wandb_probes: dict[str, tuple[float, str | None]] = {}


def wandb_base_url() -> str:
    """The server W&B would talk to: WANDB_BASE_URL, else W&B's cloud."""
    return (os.environ.get("WANDB_BASE_URL") or "").strip().rstrip("/") or WANDB_DEFAULT_URL


def endpoint_unreachable(url: str, timeout: float = WANDB_PROBE_S) -> str | None:
    """Why `url` does not answer an HTTP request within `timeout` seconds in all (DNS included,
    which urllib's own timeout does not bound), or None when it answers at all (any status)."""
    import urllib.error
    import urllib.request

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # it answered: reachable (the request's own status does not matter)
        except (urllib.error.URLError, OSError, ValueError) as err:  # DNS, refused, timeout, a bad URL
            outcome.append(str(getattr(err, "reason", None) or err))

    thread = threading.Thread(target=probe, name="smolflow-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not outcome:
        return f"no answer within {timeout:g} s"
    return outcome[0]


def wandb_unreachable() -> str | None:
    """Why W&B's host cannot be reached now ('<url> is unreachable (...)'), or None; one probe per
    host serves the next two minutes of this process."""
    url = wandb_base_url()
    now = time.monotonic()
    cached = _wandb_probes.get(url)
    if cached is None or now - cached[0] > _WANDB_PROBE_TTL_S:
        why = endpoint_unreachable(url)
        cached = _wandb_probes[url] = (now, f"{redact_url(url)} is unreachable ({why})" if why else None)
    return cached[1]


def auto_wandb_mode(cfg) -> tuple[str, str | None]:
    """(the mode W&B runs in, why `auto` fell back to offline although a key is set, or None):
    'auto' is online when WANDB_API_KEY is set and W&B's host answers, else offline."""
    if cfg.mode != "auto":
        return cfg.mode, None
    if not os.environ.get("WANDB_API_KEY"):
        return "offline", None
    if why := wandb_unreachable():
        return "offline", f"WANDB_API_KEY is set but {why}"
    return "online", None


def wandb_key_found() -> bool:
    """Whether wandb.init would find credentials without prompting: WANDB_API_KEY,
    WANDB_IDENTITY_TOKEN_FILE, or a .netrc entry for the host (NETRC or ~/.netrc, as `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=wandb_base_url()))
    except ImportError:  # another wandb: read the file as it does
        import netrc
        from urllib.parse import urlsplit

        path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
        try:
            creds = netrc.netrc(path).authenticators(urlsplit(wandb_base_url()).netloc)
        except (OSError, netrc.NetrcParseError):
            return False
        return bool(creds and creds[2])
    except Exception:  # a key in a form W&B refuses: wandb.init says why
        return True


def check_wandb(cfg) -> None:
    """wandb.mode 'online' can log: a key is configured and W&B's host answers (in a few seconds),
    not `UsageError: No API key configured` or a CommError after the model is loaded. 'auto' needs
    no check: it falls back to offline files (tasks/tracking.py)."""
    if cfg.mode != "online":
        return
    if not wandb_key_found():
        from urllib.parse import urlsplit

        raise ConfigError(f"wandb.mode='online': no W&B API key (WANDB_API_KEY is not set and ~/.netrc has no "
                          f"entry for machine {urlsplit(redact_url(wandb_base_url())).netloc}); export WANDB_API_KEY or run "
                          "`wandb login`, or set wandb.mode to 'auto' (online when a key is set) or 'offline'")
    if why := wandb_unreachable():
        raise ConfigError(f"wandb.mode='online': {why}; fix the network (or WANDB_BASE_URL), or set wandb.mode "
                          "to 'auto' (offline files when W&B cannot be reached; `wandb sync` them later) or 'offline'")
