"""Tokenization stage: the on-disk cache (hit, and misses on changed template, data or
max_length), token-length statistics and their files/artifact, and assistant-only masks."""

import json
import shutil

import pytest
from datasets import Dataset

from tasks.config import DataConfig, TrainingConfig
from tasks.data import load_chat_dataset
from tasks.models import resolve_model
from tasks.storage import ArtifactStore
from tasks.tokenization import (
    TokenizationError,
    load_tokenized,
    tokenize_dataset,
    tokenized_splits,
    write_token_stats,
)

# SmolLM2's ChatML with {% generation %} around each assistant turn and its <|im_end|>, as the
# templates stage ships it for assistant-only loss.
GENERATION_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _model_with_template(src, dst, template):
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    return resolve_model.fn(str(dst))


def _data(path, train, test):
    path.mkdir(exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (path / f"{name}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return load_chat_dataset.fn(DataConfig(dataset=str(path)))


def _chat(n, answer="ok"):
    # Under SmolLM2's template (default system prompt) this conversation is 34 + n tokens long.
    return [{"role": "user", "content": "hi" + " x" * n}, {"role": "assistant", "content": answer}]


def test_unchanged_inputs_reuse_the_cache_without_tokenizing(tiny_ref, fixture_data, monkeypatch):
    first = tokenized_splits(tiny_ref, fixture_data, max_length=97)  # a max_length no other test uses
    assert not first.cached and first.rows == fixture_data.rows

    def tripwire(*args, **kwargs):
        raise AssertionError("datasets.map ran: the cached tokens were not reused")

    monkeypatch.setattr(Dataset, "map", tripwire)
    again = tokenized_splits(tiny_ref, fixture_data, max_length=97)
    assert again.cached and again.path == first.path and again.key == first.key
    assert again.stats == first.stats


def test_changed_template_data_or_max_length_miss_the_cache(tiny_model_dir, tiny_ref, fixture_data, tmp_path,
                                                            monkeypatch):
    # A cache of its own: other tests on this worker tokenize the same data at these lengths too.
    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    base = tokenized_splits(tiny_ref, fixture_data, max_length=128)
    template = (tiny_model_dir / "chat_template.jinja").read_text().replace("named SmolLM", "named Smol")
    other_template = _model_with_template(tiny_model_dir, tmp_path / "other-template", template)
    other_data = _data(tmp_path / "data", [_chat(i) for i in range(3)], [_chat(9)])
    changed = {
        "template": tokenized_splits(other_template, fixture_data, max_length=128),
        "data": tokenized_splits(tiny_ref, other_data, max_length=128),
        "max_length": tokenized_splits(tiny_ref, fixture_data, max_length=64),
    }
    for what, ref in changed.items():
        assert not ref.cached and ref.key != base.key and ref.path != base.path, what
    from transformers import AutoTokenizer

    decode = AutoTokenizer.from_pretrained(tiny_model_dir).decode
    first = {name: load_tokenized(ref)[0][0]["input_ids"] for name, ref in (("base", base), *changed.items())}
    assert "named Smol, trained" in decode(first["template"]) and "SmolLM" not in decode(first["template"])
    assert len(first["max_length"]) == 64 and first["max_length"] == first["base"][:64]


def test_token_length_stats_on_a_hand_made_dataset(tiny_ref, tmp_path, caplog):
    data = _data(tmp_path / "data", [_chat(n) for n in (26, 6, 46, 16, 36)], [_chat(0)])  # 60, 40, 80, 50, 70 tokens
    ref = tokenize_dataset.fn(tiny_ref, data, max_length=65)
    train, test = ref.stats.splits["train"], ref.stats.splits["test"]
    assert (train.rows, train.min, train.median, train.max, train.mean) == (5, 40, 60.0, 80, 60.0)
    assert train.p95 == pytest.approx(78.0)  # between the two longest, 95% of the way
    assert train.over_max_length == 2 and ref.stats.over_max_length == 2
    assert (test.rows, test.min, test.max, test.over_max_length) == (1, 34, 34, 0)
    assert sum(train.hist_counts) == 5 and train.hist_edges[0] == 0 and train.hist_edges[-1] > 80
    assert "2 conversation(s) are longer than training.max_length=65" in caplog.text
    # What trains is cut to max_length; the stats keep the full lengths.
    assert sorted(len(ids) for ids in load_tokenized(ref)[0]["input_ids"]) == [40, 50, 60, 65, 65]


def test_stats_files_and_table_artifact(tiny_ref, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    data = _data(tmp_path / "data", [_chat(n) for n in (6, 16, 26)], [_chat(0)])
    stats = tokenized_splits(tiny_ref, data, max_length=45).stats
    run = ArtifactStore(str(tmp_path / "run"))
    write_token_stats(run, stats)
    assert (tmp_path / "run/data/token_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.read_json("data/token_lengths.json")["splits"]["train"]["over_max_length"] == 2
    with get_client(sync_client=True) as client:
        by_key = ArtifactFilter(key=ArtifactFilterKey(any_=["smolflow-token-lengths"]))
        found = client.read_artifacts(artifact_filter=by_key)
    # Flow runs (here or in other test workers sharing the server) make this key too: the newest made outside one.
    table = json.loads(max((a for a in found if a.flow_run_id is None), key=lambda a: a.created).data)
    rows = [(r["split"], r["rows"], r["max"], r["over max_length"]) for r in table]
    assert rows == [("train", 3, 60, 2), ("test", 1, 34, 0)]


def test_assistant_masks_cover_each_assistant_turn_and_its_eos(tiny_model_dir, tmp_path):
    model = _model_with_template(tiny_model_dir, tmp_path / "gen", GENERATION_CHATML)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you."},
    ]
    data = _data(tmp_path / "data", [conversation, _chat(200, "late")], [_chat(1)])
    ref = tokenized_splits(model, data, max_length=64, assistant_only_loss=True)
    train, _ = load_tokenized(ref)
    # The long row's only assistant turn lies past max_length: no loss left, so it is dropped.
    assert ref.rows["train"] == 1 and ref.stats.splits["train"].no_loss_rows == 1
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = train[0]["input_ids"], train[0]["assistant_masks"]
    assert len(mask) == len(ids)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "Hello!<|im_end|>See you.<|im_end|>"
    untrained = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "Be brief." in untrained and "Hi there" in untrained and "Bye" in untrained
    assert "Hello" not in untrained


def test_assistant_only_tokens_train_exactly_like_trls_own_tokenization(tiny_model_dir, tmp_path):
    """TRL builds the same labels from our cached masks as from conversations it tokenizes itself."""
    from trl import SFTConfig, SFTTrainer

    from tasks.models import load_model

    model_ref = _model_with_template(tiny_model_dir, tmp_path / "gen", GENERATION_CHATML)
    data = _data(tmp_path / "data", [_chat(n, f"answer {n}") for n in range(4)], [_chat(9)])
    model, tokenizer = load_model(model_ref)
    ours, _ = load_tokenized(tokenized_splits(model_ref, data, max_length=256, assistant_only_loss=True))
    conversations = Dataset.from_list([{"messages": _chat(n, f"answer {n}")} for n in range(4)])

    def prepared(dataset, assistant_only):
        args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=256, assistant_only_loss=assistant_only,
                         use_cpu=True, bf16=False, report_to=[], shuffle_dataset=False)
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train_dataset

    theirs, mine = prepared(conversations, True), prepared(ours, False)
    assert mine["input_ids"] == theirs["input_ids"] and mine["labels"] == theirs["labels"]
    assert any(label == -100 for label in mine["labels"][0])  # the prompt really is masked


def test_assistant_only_without_generation_markers_is_refused(tiny_ref, fixture_data):
    with pytest.raises(TokenizationError) as err:
        tokenized_splits(tiny_ref, fixture_data, max_length=128, assistant_only_loss=True)
    assert "{% generation %}" in str(err.value) and "template.chat_template='chatml-assistant-only'" in str(err.value)


def test_a_row_the_template_cannot_render_is_named(tiny_ref, tmp_path):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
             {"role": "assistant", "content": "A cat."}]
    data = _data(tmp_path / "data", [_chat(1), parts], [_chat(2)])
    assert data.shapes["multimodal"] == 1
    with pytest.raises(TokenizationError) as err:
        tokenized_splits(tiny_ref, data, max_length=128)
    assert "split 'train' row 1" in str(err.value) and "template.chat_template" in str(err.value)


def test_training_uses_the_cached_tokens(tiny_ref, fixture_data, tmp_path, monkeypatch):
    """train_sft trains on the TokenizedRef tokenize_dataset returned: with tokenizing made impossible,
    it still trains."""
    from tasks import tokenization
    from tasks.training import train_sft

    cfg = TrainingConfig(max_steps=1, eval_steps=1, save_steps=100, max_length=96)
    tokens = tokenize_dataset.fn(tiny_ref, fixture_data, cfg.max_length)
    monkeypatch.setattr(tokenization, "tokenize_split", lambda *a, **k: pytest.fail("re-tokenized"))
    result = train_sft.fn(tiny_ref, tokens, cfg, str(tmp_path / "run"), [])
    assert result.metrics["steps"] == 1
