"""Chat templates (own or cloned ChatML) and batched greedy generation."""

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
