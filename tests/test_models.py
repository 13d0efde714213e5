"""Model sources: built-in GGUF conversion (cached), local directories, hub ids offline."""

import time

import pytest

from tasks.models import BUILTIN, ModelRef, fingerprint_dir, load_model, resolve_model


def test_builtin_conversion_gives_a_trainable_cached_model(builtin_dir):
    from tasks import models

    weights = builtin_dir / "model.safetensors"
    before = weights.stat()
    ref = resolve_model.fn(BUILTIN)
    after = weights.stat()  # the same file, not written again: the GGUF conversion is cached
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert ref.path == str(models.convert_builtin())
    model, tokenizer = load_model(ref)
    assert not hasattr(model.config, "quantization_config")  # the Trainer accepts it
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_local_directory_is_fingerprinted_by_content(tiny_model_dir, tmp_path):
    import shutil

    ref = resolve_model.fn(str(tiny_model_dir))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert resolve_model.fn(str(copy)).fingerprint == ref.fingerprint
    (copy / "generation_config.json").write_text('{"do_sample": false}')
    assert fingerprint_dir(copy) != ref.fingerprint


def test_a_large_files_digest_is_remembered_until_the_file_changes(tmp_path):
    import os

    from tasks.runtime import REMEMBER_BYTES, remembered_digest, sha256_files

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(os.urandom(REMEMBER_BYTES + 1))
    (model / "config.json").write_text("{}")
    for f in model.iterdir():
        os.utime(f, (time.time() - 60, time.time() - 60))  # written a while ago: not "racy"
    files = sorted(model.iterdir())
    first = fingerprint_dir(model)
    assert first == sha256_files(files)
    calls = []
    again = lambda: calls.append(1) or "computed again"  # noqa: E731
    assert remembered_digest("files", files, again) == first and not calls  # remembered, not re-read
    linked = tmp_path / "linked"  # how a cached run's model enters a new run folder
    linked.mkdir()
    for f in files:
        os.link(f, linked / f.name)
    assert remembered_digest("files", sorted(linked.iterdir()), again) == first and not calls
    with open(weights, "r+b") as f:
        f.write(b"changed")  # in place: same size, same inode, new mtime
    assert fingerprint_dir(model) == sha256_files(files) != first
    assert remembered_digest("files", files, again) == "computed again"  # modified just now: never remembered


def test_hub_id_offline_gives_a_clear_error():
    with pytest.raises(RuntimeError, match="not in the local Hugging Face cache"):
        resolve_model.fn("HuggingFaceTB/SmolLM2-135M")


def test_an_unreachable_hub_is_retried_and_offline_mode_is_not(monkeypatch):
    """A refused connection may succeed on a later attempt, so resolve_model's retries take it;
    HF_HUB_OFFLINE=1 fails alike every time, so it is tried once (tests/test_retries.py)."""
    from huggingface_hub import constants

    from tasks.models import download_hub_model
    from tasks.runtime import is_transient

    with pytest.raises(RuntimeError, match="not in the local Hugging Face cache") as offline:
        download_hub_model("HuggingFaceTB/SmolLM2-360M")
    assert not is_transient(offline.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused
    with pytest.raises(ConnectionError, match="not in the local Hugging Face cache.*ConnectError") as online:
        download_hub_model("HuggingFaceTB/SmolLM2-360M")
    assert is_transient(online.value)


def test_auto_offline_is_the_builtin_model():
    from tasks.models import resolve_source

    assert resolve_source("auto") == BUILTIN


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"not a model directory \(need config.json \+ weights\)"):
        resolve_model.fn(str(tmp_path))


def test_an_adapter_folder_and_a_model_without_tokenizer_are_named_with_the_fix(tiny_model_dir, tmp_path):
    """What axolotl and peft leave (an adapter), and a model saved without its tokenizer, are named
    before anything loads (the latter failed deep in a benchmark, blaming sentencepiece)."""
    import shutil

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a LoRA/peft adapter \(adapter_config.json\), not a whole model: merge"):
        resolve_model.fn(str(adapter))
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"no tokenizer files in it .*tokenizer.save_pretrained"):
        resolve_model.fn(str(bare))
    (bare / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no weights in it"):
        resolve_model.fn(str(bare))


def test_a_deleted_cached_model_is_reported_not_crashed(tmp_path):
    ref = ModelRef(source="x", path=str(tmp_path / "gone"), fingerprint="0")
    with pytest.raises(FileNotFoundError, match="PREFECT_TASKS_REFRESH_CACHE"):
        load_model(ref)
