"""Which strings become control tokens for this run: the data stage checks message text for them.

The data stage has no tokenizer, and the template stage (which comes after it) may add tokens: a
template-less model gets ChatML's <|im_start|>/<|im_end|>, a shipped template's end-of-turn token
is added when the vocabulary lacks it. So the list is the model tokenizer's added tokens (special
or not: an added token is matched whole in text either way) plus the markers of the template this
run will use.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import TemplateConfig
from tasks.models import ModelRef, local_model_dir


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
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sorted(t for t in tokenizer_tokens(tokenizer) | template_markers(cfg, tokenizer.chat_template) if t)
