"""LoRA with a chat template that adds tokens (Llama-3's <|eot_id|> as SmolLM2's EOS): the new
rows of the embedding (and LM head) train too, and the published merged model carries them. LoRA
alone left them at their initial values: the tuned model never learned to stop."""

import json
from pathlib import Path

import pytest

from tasks.config import TemplateConfig, TrainingConfig
from tasks.templates import ADDED_TOKENS_FILE, added_token_ids, prepare_chat_template
from tasks.training import train_sft
from tests.conftest import tokens_of

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
LORA_PARAMS = 2 * (4 * (64 + 64) + 4 * (64 + 32))  # q/v of 2 layers at rank 4 (64 -> 64 and 64 -> 32)


def _lora_cfg() -> TrainingConfig:
    return TrainingConfig(max_steps=3, logging_steps=1, eval_steps=3, save_steps=3, max_length=128,
                          learning_rate=0.01, peft=LORA)


@pytest.fixture
def untied_ref(tiny_model_dir, tmp_path):
    """The tiny Llama with an LM head of its own (not tied to the embedding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = type(model.lm_head.weight)(model.lm_head.weight.detach().clone())
    path = tmp_path / "tiny-untied"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return resolve_model.fn(str(path))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_trains_the_eos_token_the_template_added(tiny_ref, untied_ref, fixture_data, tmp_path, tied, caplog):
    import logging

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_ref = tiny_ref if tied else untied_ref
    templated = prepare_chat_template.fn(base_ref, fixture_data, TemplateConfig(chat_template="llama3"))
    eot = AutoTokenizer.from_pretrained(templated.model.path).convert_tokens_to_ids("<|eot_id|>")
    assert added_token_ids(templated.model.path) == [eot] == [49152]  # SmolLM2's vocabulary has 49,152 tokens
    assert json.loads(Path(templated.model.path, ADDED_TOKENS_FILE).read_text())["tokens"] == ["<|eot_id|>"]

    cfg = _lora_cfg()
    run_uri = str(tmp_path / "runs" / "lora")
    with caplog.at_level(logging.INFO, logger="smolflow"):
        result = train_sft.fn(templated.model, tokens_of(templated.model, fixture_data, cfg), cfg, run_uri, [])
    said = [r.getMessage() for r in caplog.records if "the chat template added" in r.getMessage()]
    assert len(said) == 1 and f"'<|eot_id|>' id {eot}" in said[0], said

    # The adapters and the new token's row (its LM-head row too when the head has weights of its own).
    assert result.metrics["trainable_params"] == LORA_PARAMS + 64 * (1 if tied else 2)
    recorded = result.trainer_args["smolflow_lora_new_tokens"]
    assert recorded["tokens"] == ["<|eot_id|>"]
    assert recorded["trainable_token_indices"] == (
        {"model.embed_tokens": [eot]} if tied else {"model.embed_tokens": [eot], "lm_head": [eot]})

    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "lora" / "model")
    before = AutoModelForCausalLM.from_pretrained(templated.model.path)
    assert not any("lora" in name or "token_adapter" in name for name in tuned.state_dict())  # merged: plain
    for get in ("get_input_embeddings", "get_output_embeddings"):
        new, old = getattr(tuned, get)().weight, getattr(before, get)().weight
        assert not torch.allclose(new[eot], old[eot]), f"{get}: the new EOS row was not trained"
        assert torch.equal(new[:eot], old[:eot])  # the rows of the original vocabulary: as they were
    assert (tuned.get_output_embeddings().weight is tuned.get_input_embeddings().weight) == tied


def test_without_added_tokens_lora_trains_only_the_adapters(tiny_ref, fixture_data, tmp_path):
    """ChatML on SmolLM2's tokenizer adds nothing: the adapters alone, as before."""
    templated = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template="chatml"))
    assert added_token_ids(templated.model.path) == []  # SmolLM2 has ChatML's tokens, <|im_end|> its EOS
    cfg = _lora_cfg().model_copy(update={"max_steps": 1, "eval_steps": 1, "save_steps": 1})
    result = train_sft.fn(templated.model, tokens_of(templated.model, fixture_data, cfg), cfg,
                          str(tmp_path / "runs" / "plain"), [])
    assert result.metrics["trainable_params"] == LORA_PARAMS
    assert "smolflow_lora_new_tokens" not in result.trainer_args
