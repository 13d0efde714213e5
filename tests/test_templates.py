"""Chat templates: each choice (own, shipped, file, unknown, missing), the EOS every assistant turn
ends with, tool calls and image parts rendered or refused, assistant-only loss on TRL's real
batches, the preview artifact, and the cache key following the .jinja file's content."""

import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from tasks.config import DataConfig, RunConfig, TemplateConfig, TrainingConfig
from tasks.data import DatasetRef, load_chat_dataset
from tasks.models import load_model
from tasks.storage import ArtifactStore
from tasks.templates import (
    PREVIEW_KEY,
    PREVIEW_PATH,
    SYSTEM_EXAMPLE,
    TemplateError,
    prepare_chat_template,
    preview_markdown,
    shipped_text,
    write_template_preview,
)
from tasks.training import prepare_splits, sft_config

TOOL_ROW = [  # the seed tutorial's conversation, its calls in the OpenAI/HF shape the data stage accepts
    {"role": "system", "content": "You are an AI assistant that can use tools."},
    {"role": "user", "content": "What's 123 * 456 and is it raining in Paris?"},
    {"role": "assistant", "content": "Let me help you with that.", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"operation": "multiply", "x": 123}}},
        {"type": "function", "function": {"name": "weather_api", "arguments": {"city": "Paris", "country": "France"}}},
    ]},
    {"role": "tool", "content": "56088"},
    {"role": "tool", "content": "{'condition': 'rain', 'temperature': 15}"},
    {"role": "assistant", "content": "123 * 456 = 56088, and yes, it is raining in Paris."},
]
IMAGE_ROW = [
    {"role": "user", "content": [{"type": "text", "text": "What's in this image?"},
                                 {"type": "image", "image_url": "https://example.com/image.jpg"}]},
    {"role": "assistant", "content": "A cat on a sofa."},
]
PLAIN_ROW = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]


def dataset_ref(tmp_path: Path, rows: list[list[dict]]) -> DatasetRef:
    """The rows through the real data stage (checked, shapes counted, saved), as train and test."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return load_chat_dataset.fn(DataConfig(dataset=str(folder)))


def test_chatml_is_smollm2_instructs_own_template_and_the_assistant_only_variant_renders_the_same(
        builtin_dir, fixture_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_dir)
    assert shipped_text("chatml") == tokenizer.chat_template
    marked = shipped_text("chatml-assistant-only")
    for row in [*load_from_disk(fixture_data.path)["train"]["messages"][:8], SYSTEM_EXAMPLE]:
        assert tokenizer.apply_chat_template(row, chat_template=marked, tokenize=False) == \
            tokenizer.apply_chat_template(row, tokenize=False)


def test_model_and_chatml_keep_smollm2s_template_unchanged(tiny_ref, fixture_data):
    for choice in ("model", "chatml"):
        out = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template=choice))
        assert out.model == tiny_ref  # same template text, same EOS: no new model directory
        assert out.eos_token == "<|im_end|>" and out.rendered_example.startswith("<|im_start|>system")


@pytest.mark.parametrize("name,eos,marker", [("mistral", "</s>", " [INST] Hi [/INST] Hello!"),
                                             ("llama3", "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>")])
def test_shipped_template_by_name_ends_every_assistant_turn_in_a_one_token_eos(tiny_ref, fixture_data, name, eos,
                                                                               marker):
    out = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template=name))
    assert out.template_name == name and out.eos_token == eos and marker in out.rendered_example
    assert out.model.fingerprint != tiny_ref.fingerprint
    model, tokenizer = load_model(out.model)
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    assert tokenizer.eos_token == eos and tokenizer(eos, add_special_tokens=False)["input_ids"] == [eos_id]
    assert model.generation_config.eos_token_id == eos_id == model.config.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)  # the new token has an embedding
    ids = tokenizer.apply_chat_template(PLAIN_ROW, tokenize=True, return_dict=True)["input_ids"]
    # the reply is followed by the EOS, as one token
    assert ids[-1] == eos_id and tokenizer.decode(ids[:-1]).endswith(PLAIN_ROW[-1]["content"])


@pytest.fixture(scope="module")
def no_chatml_ref(tmp_path_factory):
    """A tiny base model whose own small BPE vocabulary has no <|im_start|>/<|im_end|> and no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tasks.models import resolve_model
    from tests.conftest import _tiny_llama

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([m["content"] for m in SYSTEM_EXAMPLE], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return resolve_model.fn(str(_tiny_llama(tokenizer, tmp_path_factory.mktemp("no-chatml"))))


@pytest.mark.parametrize("choice", ["model", "chatml"])
def test_chatml_on_a_model_without_its_tokens_clones_them_and_makes_im_end_the_eos(no_chatml_ref, fixture_data,
                                                                                    choice):
    out = prepare_chat_template.fn(no_chatml_ref, fixture_data, TemplateConfig(chat_template=choice))
    assert out.template_name == "chatml" and "ChatML tokens cloned from smollm2-135m-instruct" in out.template_source
    assert out.eos_token == "<|im_end|>" and out.rendered_example.startswith("<|im_start|>system\n")
    model, tokenizer = load_model(out.model)
    ids = tokenizer.apply_chat_template(PLAIN_ROW, tokenize=True, return_dict=True)["input_ids"]
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 3 and ids.count(end) == 3 and ids[-2:] == [end, tokenizer("\n")["input_ids"][0]]
    assert model.generation_config.eos_token_id == end == tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer) > 301


def test_template_from_a_jinja_file(tiny_ref, fixture_data, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}"
                    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}")
    out = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template=str(path)))
    assert out.template_name == str(path) and out.template_source == f"file {path}"
    assert out.rendered_example.startswith("### user: Hi\n### assistant: Hello! How can I help you today?<|im_end|>")
    _, tokenizer = load_model(out.model)
    assert tokenizer.chat_template == path.read_text()


def test_unknown_name_and_missing_file_name_the_parameter_and_the_choices(tiny_ref, fixture_data, tmp_path):
    # Rejected when the config is built (the UI form, the CLI) ...
    with pytest.raises(ValueError, match=r"template.chat_template\n.*'chatml2' is neither a shipped template"):
        RunConfig(template={"chat_template": "chatml2"})
    # ... and again when applied: a config checked on one machine may run where the file is missing.
    with pytest.raises(TemplateError, match=r"template.chat_template='chatml2' is not a known template: "
                                            r"choose one of 'model', 'chatml', 'chatml-assistant-only', 'mistral', 'llama3'"):
        prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig.model_construct(chat_template="chatml2"))
    missing = tmp_path / "nope.jinja"
    with pytest.raises(TemplateError, match=rf"template.chat_template='{missing}': no such file .*'model', 'chatml'"):
        prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig.model_construct(chat_template=str(missing)))


def test_template_that_never_ends_a_turn_is_refused(tiny_ref, fixture_data, tmp_path):
    path = tmp_path / "endless.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}")
    with pytest.raises(TemplateError, match="writes nothing after an assistant reply.*end-of-turn token"):
        prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template=str(path)))


@pytest.mark.parametrize("text, line, error", [
    # a syntax error: `{% endfor` left open on line 3, which Jinja finds on line 4
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor\n"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", 4, "TemplateSyntaxError"),
    # a runtime error (after comment lines): content + 1
    ("{#- a comment\n  on two lines -#}\n{%- for m in messages %}\n{{- m.content + 1 }}<|im_end|>\n{%- endfor %}", 4,
     "TypeError"),
    ("line one\n{{ raise_exception('only user turns') }}", 2, "TemplateError: only user turns"),
], ids=["syntax", "runtime", "raise_exception"])
def test_a_broken_jinja_file_is_refused_naming_its_line(tiny_ref, fixture_data, tmp_path, text, line, error):
    """A template error named no line: in a long .jinja the typo had to be found by bisecting it."""
    path = tmp_path / "broken.jinja"
    path.write_text(text)
    with pytest.raises(TemplateError, match=rf"cannot render a plain user/assistant exchange \(line {line} of the "
                                            rf"template\): {error}"):
        prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template=str(path)))


def test_cache_key_follows_the_jinja_files_content(tiny_ref, fixture_data, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(shipped_text("llama3"))
    cfg = TemplateConfig(chat_template=str(path))
    first = prepare_chat_template(tiny_ref, fixture_data, cfg, return_state=True)
    assert first.name == "Completed"
    assert prepare_chat_template(tiny_ref, fixture_data, cfg, return_state=True).name == "Cached"
    path.write_text(shipped_text("llama3").replace("<|image|>", "<|img|>"))  # same config, new content
    edited = prepare_chat_template(tiny_ref, fixture_data, cfg, return_state=True)
    assert edited.name == "Completed"
    assert edited.result().model.fingerprint != first.result().model.fingerprint


# ---- tool calls and content parts ------------------------------------------------------------


def test_tool_calls_and_image_parts_render_with_llama3(tiny_ref, tmp_path):
    data = dataset_ref(tmp_path, [PLAIN_ROW, TOOL_ROW, IMAGE_ROW])
    out = prepare_chat_template.fn(tiny_ref, data, TemplateConfig(chat_template="llama3"))
    assert out.shapes == {"tool_calls": 2, "tool_messages": 2, "multimodal": 2}  # train + test
    _, tokenizer = load_model(out.model)
    tools = tokenizer.apply_chat_template(TOOL_ROW, tokenize=False)
    assert '{"name": "calculator", "parameters": {"operation": "multiply", "x": 123}}' in tools
    assert '{"name": "weather_api", "parameters": {"city": "Paris", "country": "France"}}' in tools
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n56088<|eot_id|>" in tools
    image = tokenizer.apply_chat_template(IMAGE_ROW, tokenize=False)
    assert "user<|end_header_id|>\n\nWhat's in this image?<|image|><|eot_id|>" in image


@pytest.mark.parametrize("row,shape", [(TOOL_ROW, "tool_calls"), (IMAGE_ROW, "multimodal")])
def test_smollm2_chatml_refuses_tool_calls_and_image_parts_naming_its_limit(tiny_ref, tmp_path, row, shape):
    data = dataset_ref(tmp_path, [PLAIN_ROW, row])
    with pytest.raises(TemplateError) as err:
        prepare_chat_template.fn(tiny_ref, data, TemplateConfig(chat_template="model"))
    message = str(err.value)
    assert "template 'model' (tiny" in message and "own template) does not render `" + shape + "`" in message
    assert "split 'train', 1 row(s)" in message and "for row 1" in message
    assert "template.chat_template='llama3'" in message and "drop those rows" in message


def test_mistral_refuses_tool_rows(tiny_ref, tmp_path):
    data = dataset_ref(tmp_path, [PLAIN_ROW, TOOL_ROW])
    with pytest.raises(TemplateError, match=r"'mistral' does not render `tool_calls`.*rendering it fails \(TemplateError: After the optional system message"):
        prepare_chat_template.fn(tiny_ref, data, TemplateConfig(chat_template="mistral"))


# ---- assistant-only loss ---------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["model", "chatml", "chatml-assistant-only"])
def test_assistant_only_switches_chatml_to_the_marked_variant(tiny_ref, fixture_data, choice):
    out = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template=choice, assistant_only_loss=True))
    assert out.template_name == "chatml-assistant-only" and out.assistant_only
    _, tokenizer = load_model(out.model)
    assert tokenizer.chat_template == shipped_text("chatml-assistant-only")


def test_assistant_only_with_a_template_without_markers_is_refused(tiny_ref, fixture_data):
    with pytest.raises(TemplateError, match=r"template.chat_template='mistral' has none.*'chatml-assistant-only'"):
        prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template="mistral", assistant_only_loss=True))


def _pairs_ref(tmp_path: Path, layout: str) -> DatasetRef:
    folder = tmp_path / layout.replace("/", "-")
    folder.mkdir()
    rows = {"prompt/completion": [{"prompt": "What is 2+2?", "completion": "4"}],
            "sharegpt": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]}
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[layout]))
    return load_chat_dataset.fn(DataConfig(dataset=str(folder)))


@pytest.mark.parametrize("layout", ["prompt/completion", "sharegpt"])
def test_auto_trains_pairs_and_sharegpt_rows_on_the_replies_as_their_tools_do(tiny_ref, tmp_path, layout):
    """template.assistant_only_loss 'auto' (the default): TRL trains prompt/completion rows on the
    completion only, axolotl and LLaMA-Factory ShareGPT rows on the replies; the run says so."""
    data = _pairs_ref(tmp_path, layout)
    assert data.layout == layout and f"read from {layout} rows" in data.markdown()
    out = prepare_chat_template.fn(tiny_ref, data, TemplateConfig())
    assert out.assistant_only and out.template_name == "chatml-assistant-only"
    assert out.loss_why.lower().startswith(f"auto: {layout} rows, as ")
    assert "Trained on: assistant replies and their EOS only (assistant_only_loss: system, user and tool tokens " \
           f"are -100); {out.loss_why}." in out.preview
    _, tokenizer = load_model(out.model)
    messages = load_from_disk(data.path)["train"][0]["messages"]
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(kept) == messages[-1]["content"] + tokenizer.eos_token  # the reply and its EOS only


def test_auto_trains_messages_rows_on_every_token_and_falls_back_where_a_template_cannot_mark(
        tiny_ref, fixture_data, tmp_path, caplog):
    out = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig())
    assert fixture_data.layout == "messages" and not out.assistant_only and out.template_name == "model"
    assert out.loss_why == "auto: messages rows, as TRL trains them"
    pairs = _pairs_ref(tmp_path, "prompt/completion")
    out = prepare_chat_template.fn(tiny_ref, pairs, TemplateConfig(chat_template="mistral"))
    assert not out.assistant_only and out.template_name == "mistral"  # explicit true is refused instead (above)
    assert "template.chat_template='mistral' cannot mark the replies" in out.loss_why
    assert "template.assistant_only_loss auto: prompt/completion rows, but" in caplog.text


def test_generation_block_without_the_eos_is_refused(tiny_ref, fixture_data, tmp_path):
    path = tmp_path / "eos-outside.jinja"
    path.write_text(shipped_text("chatml-assistant-only").replace(
        "{{- message['content'] + '<|im_end|>' }}\n        {%- endgeneration %}",
        "{{- message['content'] }}\n        {%- endgeneration %}{{- '<|im_end|>' }}"))
    assert path.read_text() != shipped_text("chatml-assistant-only")
    with pytest.raises(TemplateError, match=r"generation %\} block must enclose the assistant reply AND its"):
        prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template=str(path), assistant_only_loss=True))


def _labelled_batch(templated, fixture_data, tmp_path, padding_free: bool):
    """The first batch TRL's real SFTTrainer builds with assistant-only loss. Padded: TRL renders the
    conversations and masks them itself (SFTConfig.assistant_only_loss). Padding-free: the data comes
    tokenized with `assistant_masks` (tasks/tokenization.py), from which TRL makes the labels."""
    from trl import SFTTrainer

    model, tokenizer = load_model(templated.model)
    cfg = TrainingConfig(max_steps=1, per_device_train_batch_size=4, max_length=512, padding_free=padding_free)
    args = sft_config(cfg, str(tmp_path), [])
    if padding_free:
        train, test = prepare_splits(load_from_disk(fixture_data.path), tokenizer, cfg, assistant_only_loss=True)
    else:
        splits = load_from_disk(fixture_data.path)
        train, test = splits["train"], splits["test"]
        args.assistant_only_loss = True
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    return tokenizer, batch["input_ids"].tolist(), batch["labels"].tolist()


@pytest.mark.parametrize("padding_free", [False, True])
def test_assistant_only_loss_trains_replies_and_their_eos_only(tiny_ref, fixture_data, tmp_path, padding_free):
    templated = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(assistant_only_loss=True))
    tokenizer, batch_ids, batch_labels = _labelled_batch(templated, fixture_data, tmp_path, padding_free)
    start, eos = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.eos_token_id
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    replies = others = 0
    for ids, labels in zip(batch_ids, batch_labels):  # padding-free: one row of packed conversations
        for s in (i for i, t in enumerate(ids) if t == start):
            end = ids.index(eos, s)
            if ids[s + 1 : s + 1 + len(header)] == header:  # "<|im_start|>assistant\n" out; reply + <|im_end|> in
                body = s + 1 + len(header)
                assert all(label == -100 for label in labels[s:body])
                assert labels[body : end + 1] == ids[body : end + 1], "reply or its EOS masked out"
                replies += 1
            else:  # system and user turns, their <|im_end|> included: out of the loss
                assert all(label == -100 for label in labels[s : end + 1]), tokenizer.decode(ids[s : end + 1])
                others += 1
    assert replies >= 8 and others >= replies  # 4 conversations of 2-4 exchanges, each with a system turn


# ---- preview -----------------------------------------------------------------------------------


def test_preview_shows_three_templates_and_this_runs_with_a_token_table(tiny_ref, fixture_data):
    _, tokenizer = load_model(tiny_ref)
    first = load_from_disk(fixture_data.path)["train"][0]["messages"]
    markdown = preview_markdown(tokenizer, first, assistant_only=False)
    for heading in ("### ChatML (SmolLM2-Instruct)", "### Mistral-Instruct", "### Llama-3-Instruct", "### This run"):
        assert markdown.count(heading) == 2  # the training row and the built-in example
    assert "```text\n<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in markdown  # built-in, ChatML
    assert "```text\n<s> [INST] You are a helpful assistant.\n\nHello! [/INST] Hi!" in markdown
    assert "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>" in markdown
    assert "| tokens in this tokenizer |\n|---|---|---|\n| ChatML (SmolLM2-Instruct) | <code>&lt;&#124;im_start" in markdown
    assert "| Llama-3-Instruct | <code>&lt;&#124;eot_id&#124;&gt;</code> | 8 |" in markdown  # text, not a token here
    ids = tokenizer.apply_chat_template(first, tokenize=True, return_dict=True)["input_ids"]
    table = markdown.split("| # | id | token | text | special | in loss |")[1]
    assert f"| 0 | {ids[0]} | <code>&lt;&#124;im_start&#124;&gt;</code> |" in table
    assert table.count(" | ✓ |") == len(ids) and f"{len(ids)} tokens, {len(ids)} in the loss." in table


def test_preview_marks_the_assistant_only_loss_mask(tiny_ref, fixture_data):
    out = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(assistant_only_loss=True))
    _, tokenizer = load_model(out.model)
    first = load_from_disk(fixture_data.path)["train"][0]["messages"]
    enc = tokenizer.apply_chat_template(first, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert "### This run: chatml-assistant-only" in out.preview
    table = out.preview.split("| # | id | token | text | special | in loss |")[1]
    assert table.count(" | ✓ |") == sum(enc["assistant_masks"]) < len(enc["input_ids"])
    assert table.count(" | – |") == len(enc["input_ids"]) - sum(enc["assistant_masks"])


def test_write_template_preview_writes_the_run_file_and_the_prefect_artifact(tiny_ref, fixture_data, tmp_path):
    from prefect.artifacts import Artifact

    templated = prepare_chat_template.fn(tiny_ref, fixture_data, TemplateConfig(chat_template="llama3"))
    run = ArtifactStore(str(tmp_path / "run"))
    uri = write_template_preview(run, templated)
    assert uri.endswith(PREVIEW_PATH) and (tmp_path / "run" / PREVIEW_PATH).read_text() == templated.preview
    assert "### This run: llama3" in templated.preview and "<|eot_id|>" in templated.preview
    artifact = Artifact.get(PREVIEW_KEY)
    assert artifact is not None and json.loads(json.dumps(artifact.data)) == templated.preview


def test_auto_keeps_another_models_chatml_and_its_system_prompt(tiny_model_dir, tmp_path):
    """A Qwen-style ChatML (its own default system prompt, no markers): 'auto' does not swap in
    SmolLM2's template with markers (that needs assistant_only_loss: true); every token, with a warning."""
    import shutil

    from tasks.models import resolve_model

    other = tmp_path / "qwen-like"
    shutil.copytree(tiny_model_dir, other)
    qwen = shipped_text("chatml").replace("You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                                          "You are Qwen, a helpful assistant")
    for f in ("chat_template.jinja",):
        (other / f).write_text(qwen)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    out = prepare_chat_template.fn(resolve_model.fn(str(other)), _pairs_ref(tmp_path, "prompt/completion"),
                                   TemplateConfig())
    assert not out.assistant_only and out.template_name == "model" and "You are Qwen" in out.rendered_example
    assert "cannot mark the replies" in out.loss_why


@pytest.mark.parametrize(("given", "read"), [(1, True), (0, False), ("AUTO", "auto"), ("off", False)])
def test_assistant_only_loss_takes_what_a_bool_took(given, read):
    assert TemplateConfig(assistant_only_loss=given).assistant_only_loss == read
