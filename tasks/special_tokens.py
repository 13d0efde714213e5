"""Which strings become control tokens for this run: the data stage checks message text for them.

The data stage has no tokenizer, and the template stage (which comes after it) may add tokens: a
template-less model gets ChatML's <|im_start|>/<|im_end|>, a shipped template's end-of-turn token
is added when the vocabulary lacks it. So the list is the model tokenizer's added tokens (special
or not: an added token is matched whole in text either way) plus the markers of the template this
run will use.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import TemplateConfig
from tasks.models import ModelRef, local_model_dir
from tasks.runtime import atomic_write, cache_dir


def template_markers(cfg: TemplateConfig, own_template: str | None) -> set[str]:
    """The control-token markers (ChatML, Mistral, Llama-3) the run's template writes."""
    from tasks.templates import MARKERS, TemplateError, effective_template, shipped_text

    try:
        name, text = effective_template(cfg, own_template)
    except (TemplateError, OSError):
        return set()  # the template stage raises the clear error
    if text is None:  # the model's own template, or ChatML cloned onto a model without one
        text = own_template or shipped_text("chatml")
    return {marker for markers in MARKERS.values() for marker in markers if marker in text}


def tokenizer_tokens(tokenizer) -> set[str]:
    """Every added token of a tokenizer (special and not) and its named special tokens."""
    return {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)


@task(cache_policy=NO_CACHE)
def control_tokens(model: ModelRef, cfg: TemplateConfig = TemplateConfig()) -> list[str]:
    """The strings that would tokenize as control tokens in this run (see data.special_tokens_in_text)."""
    return control_tokens_of(local_model_dir(model), cfg)


def control_tokens_of(model_dir, cfg: TemplateConfig = TemplateConfig()) -> list[str]:
    """control_tokens for a model directory that is already here."""
    tokens, chat_template = tokenizer_facts(Path(model_dir))
    return sorted(t for t in set(tokens) | template_markers(cfg, chat_template) if t)


def tokenizer_facts(model_dir: Path) -> tuple[list[str], str | None]:
    """(added and special tokens, chat template) of a model directory's tokenizer, as transformers
    loads it. Kept in SMOLFLOW_CACHE/tokenizers, keyed by the directory's files (name, size, mtime)
    and the transformers version: every run checks its inputs before the flow starts, again inside
    it and in its data stage, and loading a tokenizer (with its imports) is ~3 s of a cached re-run."""
    from importlib.metadata import version

    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.iterdir() if f.is_file())
    key = json.dumps([str(model_dir.resolve()), files, version("transformers")])
    path = cache_dir("tokenizers") / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if path.is_file():
        facts = json.loads(path.read_text(encoding="utf-8"))
        return facts["tokens"], facts["chat_template"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, chat_template = sorted(tokenizer_tokens(tokenizer)), tokenizer.chat_template
    atomic_write(path, json.dumps({"model_dir": str(model_dir), "tokens": tokens, "chat_template": chat_template}))
    return tokens, chat_template
