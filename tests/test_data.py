"""Data stage: shipped fixture, local files, and clear errors for bad rows and bad sources."""

import json

import pytest

from tasks.config import DataConfig
from tasks.data import BadRowsError, load_chat_dataset


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(i):
    return {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}


def test_fixture_is_smoltalk_shaped_and_big_enough(fixture_data):
    from datasets import load_from_disk

    assert fixture_data.rows["train"] + fixture_data.rows["test"] >= 60
    ds = load_from_disk(fixture_data.path)
    row = ds["train"][0]["messages"]
    assert row[0]["role"] == "user" and row[-1]["role"] == "assistant"


def test_same_data_gives_same_fingerprint_and_saved_copy(fixture_data):
    again = load_chat_dataset.fn(DataConfig(dataset="fixture:everyday-conversations"))
    assert again.fingerprint == fixture_data.fingerprint and again.path == fixture_data.path
    # `auto` is the same data offline, and the run's records say which (they said "Source `auto`").
    auto = load_chat_dataset.fn(DataConfig())
    assert auto.fingerprint == again.fingerprint and auto.source == "fixture:everyday-conversations"
    assert auto.markdown().startswith("Source `fixture:everyday-conversations` · ")


def test_local_directory_of_jsonl_with_row_limits(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [_chat(i) for i in range(10)])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(i) for i in range(10, 14)])
    ref = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), max_train_rows=5))
    assert ref.rows == {"train": 5, "test": 4}


def test_local_parquet_files(tmp_path):
    from datasets import Dataset

    Dataset.from_list([_chat(i) for i in range(6)]).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    Dataset.from_list([_chat(i) for i in range(2)]).to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    assert load_chat_dataset.fn(DataConfig(dataset=str(tmp_path))).rows == {"train": 6, "test": 2}


def test_changed_data_changes_the_fingerprint(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [_chat(i) for i in range(4)])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(9)])
    first = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    _write_jsonl(tmp_path / "train.jsonl", [_chat(i) for i in range(5)])
    assert load_chat_dataset.fn(DataConfig(dataset=str(tmp_path))).fingerprint != first.fingerprint


def _refused_with_a_line_not_json(folder, says: str) -> None:
    """train.jsonl plus one line that is not JSON (then read line by line, not by Arrow): refused, saying `says`."""
    (folder / "train.jsonl").write_text((folder / "train.jsonl").read_text() + "{not json\n")
    with pytest.raises(BadRowsError, match=says):
        load_chat_dataset.fn(DataConfig(dataset=str(folder)))


def _assert_bad_row_named(tmp_path, bad_row, reason):
    """A bad third training row stops the load with its split, file:line (1-based) and reason."""
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), _chat(1), bad_row])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(2)])
    with pytest.raises(BadRowsError) as err:
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    assert "split 'train'" in str(err.value) and f"{tmp_path}/train.jsonl:3: {reason}" in str(err.value)


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ({"messages": []}, "`messages` is empty"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages[0].role is 'robot'"),
        ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, "messages[0].content is empty"),
    ],
)
def test_bad_rows_are_named_with_split_row_and_reason(tmp_path, bad_row, reason):
    _assert_bad_row_named(tmp_path, bad_row, reason)


def test_fields_other_tools_read_are_refused_not_silently_dropped(tmp_path):
    """A top-level `system` column (LLaMA-Factory, Alpaca) and a per-turn `weight: 0` / `train:
    false` (axolotl) were read as nothing: the system prompt lost, the masked turn trained on."""
    weighted = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    _assert_bad_row_named(tmp_path, weighted, "messages[1].weight=0: per-turn loss switches are not read")
    untrained = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]}
    _assert_bad_row_named(tmp_path, untrained, "messages[1].train=False: per-turn loss switches are not read")
    kept = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]}
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), _chat(1), kept])
    assert load_chat_dataset.fn(DataConfig(dataset=str(tmp_path))).rows["train"] == 3  # weight 1 changes nothing
    _write_jsonl(tmp_path / "train.jsonl", [_chat(i) | {"system": "You are terse."} for i in range(3)])
    with pytest.raises(BadRowsError, match=r"split 'train' has a `system` column, which smolflow does not read.*"
                                           r"first message, \{role: system"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    # read line by line, the system field was dropped, and `bad_rows: drop` trained without it
    _refused_with_a_line_not_json(tmp_path, r"train.jsonl:1: a `system` field next to `messages`, which smolflow "
                                            r"does not read: put it in the row as the first message")


def test_sharegpt_conversations_become_messages_with_their_system_prompt(tmp_path):
    """axolotl's and LLaMA-Factory's ShareGPT rows ({from, value} turns, a `system` prompt) are read as
    conversations and checked like any; a bad speaker is named by its row."""
    from datasets import load_from_disk

    def row(i, system=None):
        out = {"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}!"}]}
        return out | ({"system": system} if system is not None else {})

    _write_jsonl(tmp_path / "train.jsonl", [row(0, "Be brief."), row(1, ""), row(2, "Be kind.")])
    _write_jsonl(tmp_path / "test.jsonl", [row(3)])
    ref = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    train = load_from_disk(ref.path)["train"]["messages"]
    assert [[(m["role"], m["content"]) for m in t] for t in train] == [
        [("system", "Be brief."), ("user", "Hi 0"), ("assistant", "Hello 0!")],
        [("user", "Hi 1"), ("assistant", "Hello 1!")],
        [("system", "Be kind."), ("user", "Hi 2"), ("assistant", "Hello 2!")]]
    bad = {"conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "upon"}]}
    _write_jsonl(tmp_path / "train.jsonl", [row(0), row(1), bad])
    # named as the file has it (it said messages[0].role, which a ShareGPT file has not)
    with pytest.raises(BadRowsError, match=r"train.jsonl:3: conversations\[0\].from is 'narrator', expected one of "
                                           r"\['assistant', 'gpt', 'human'"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    # every other row was "missing `messages`" (the line-by-line reader knew no ShareGPT)
    _refused_with_a_line_not_json(tmp_path, r"2 bad row\(s\) in split 'train': \S*train.jsonl:3: conversations\[0\]"
                                            r".from is 'narrator'.*; \S*train.jsonl:4: not valid JSON")
    kept = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), bad_rows="drop"))
    assert kept.rows["train"] == 2 and sum(kept.dropped["train"].values()) == 2


def test_missing_messages_column_says_which_schema(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    _write_jsonl(tmp_path / "test.jsonl", [{"text": "b"}])
    with pytest.raises(BadRowsError, match="no `messages` column.*or prompt/completion pairs"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))


def test_missing_split_names_the_parameter(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0)])
    with pytest.raises(ValueError, match=r"data.test_split='test' is not in the dataset.*data.test_size"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))


@pytest.mark.parametrize("name", ["test.csv", "test.jsonl.gz", "test.JSONL"])
def test_a_split_in_a_format_not_read_is_named_not_reported_missing(tmp_path, name):
    """test.csv next to train.jsonl was skipped without a word: the message listed the splits ['train'] and
    suggested data.test_size, which would hold out a test split the user has."""
    import gzip

    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), _chat(1)])
    (tmp_path / name).write_bytes(gzip.compress(b"{}\n") if name.endswith(".gz") else b"messages\nhi\n")
    (tmp_path / "README.md").write_text("about this data")  # other files stay ignored
    with pytest.raises(ValueError, match=rf"data.test_split='test': {tmp_path / name} is not read \(smolflow reads "
                                         r"uncompressed .json, .jsonl and .parquet files\); convert it"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))


def test_test_size_holds_out_the_same_rows_of_one_file_every_run(tmp_path):
    one_file = _write_jsonl(tmp_path / "chats.jsonl", [_chat(i) for i in range(40)])  # read as split 'train'
    ref = load_chat_dataset.fn(DataConfig(dataset=str(one_file), test_size=0.1))
    train, test = _ids(ref), _ids(ref, "test")
    assert ref.rows == {"train": 36, "test": 4} and not set(train) & set(test)
    assert "test: 4 rows (test held out from train: 4 of its 40 rows, before checks and limits; data.test_size=0.1, " \
           "seed 42)" in ref.markdown()  # the report's data section
    assert sorted(train + test) == sorted(f"hi {i}" for i in range(40))
    assert train == sorted(train, key=lambda t: int(t.split()[1]))  # each part in the file's order
    assert _ids(load_chat_dataset.fn(DataConfig(dataset=str(one_file), test_size=4)), "test") == test  # 4 rows = 10%
    other = load_chat_dataset.fn(DataConfig(dataset=str(one_file), test_size=4, seed=7))
    assert _ids(other, "test") != test and other.fingerprint != ref.fingerprint
    # data.shuffle and the row limits apply to the parts, after the hold-out
    limited = load_chat_dataset.fn(DataConfig(dataset=str(one_file), test_size=0.1, max_test_rows=2))
    assert _ids(limited, "test") == test[:2]


def test_test_size_is_refused_where_it_cannot_take_effect(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [_chat(i) for i in range(5)])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(9)])
    with pytest.raises(ValueError, match=r"data.test_size=0.2: the dataset has its own 'test' split; remove data.test_size"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), test_size=0.2))
    with pytest.raises(ValueError, match=r"data.test_size=5: holds out 5 of the 5 rows of split 'train', leaving 0"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path / "train.jsonl"), test_size=5))
    with pytest.raises(ValueError, match=r"data.test_size=25: holds out 25 of the 5 rows .* leaving 0 to train on; "
                       r"hold out fewer \(at most 4\)"):  # it said "leaving -20"
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path / "train.jsonl"), test_size=25))
    for bad, says in ((1.5, "a fraction of the train split is under 1"), (0, "greater than 0"),
                      ("0.5x", "'0.5x' is not a number: a whole number of rows"), ("", "'' is not a number")):
        with pytest.raises(ValueError, match=says):
            DataConfig(test_size=bad)
    DataConfig(test_size=0.05, seed=3)  # the seed picks the held-out rows: not refused without a shuffle
    with pytest.raises(ValueError, match="data.test_split='train' is also data.train_split: the eval loss would be"):
        DataConfig(test_split="train")  # once the only way to run on a single file, evaluating on trained rows
    with pytest.raises(ValueError, match="data.seed: it seeds the shuffle and test_size's held-out rows"):
        DataConfig(seed=3)


# Seed 0 holds out row 9 alone and seed 42 row 0 alone: datasets cuts one row, or consecutive rows, as a
# slice of the file with no index map (the train part of seed 42: rows 1-11); 3 rows of seed 42: 0, 6, 7.
@pytest.mark.parametrize("seed,size,split", [(0, 1, "test"), (42, 1, "train"), (42, 3, "test"), (42, 3, "train")])
def test_held_out_and_kept_bad_rows_are_named_by_their_place_in_the_file(tmp_path, seed, size, split):
    import numpy as np

    held = sorted(int(i) for i in np.random.default_rng(seed).permutation(12)[:size])
    bad = held[-1] if split == "test" else max(set(range(12)) - set(held))
    rows = [_chat(i) for i in range(12)]
    rows[bad] = {"messages": [{"role": "user", "content": "only a question"}]}
    one_file = _write_jsonl(tmp_path / "chats.jsonl", rows)
    with pytest.raises(BadRowsError, match=rf"split '{split}'.*chats.jsonl:{bad + 1}: no assistant turn"):
        load_chat_dataset.fn(DataConfig(dataset=str(one_file), test_size=size, seed=seed, shuffle=True))


def test_hub_id_offline_explains_how_to_use_local_files():
    with pytest.raises(RuntimeError) as err:
        load_chat_dataset.fn(DataConfig(dataset="HuggingFaceTB/smoltalk"))
    assert "HF_HUB_OFFLINE" in str(err.value) and "local files" in str(err.value)


@pytest.mark.parametrize("path", ["./does/not/exist", "data/train.jsonl", "d/x.parquet", "runs/a/b"])
def test_nonexistent_local_path_is_named(path):
    # `data/train.jsonl` (README's own example) was looked up on the hub, and the message said so
    with pytest.raises(ValueError, match=rf"data.dataset='{path}': no such file or directory \(from "):
        load_chat_dataset.fn(DataConfig(dataset=path))


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]},
         "a system message that is not first"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
         "messages[0] and messages[1] are both 'user' turns"),
        (_chat(0), "duplicate of {}/train.jsonl:1"),
        ({"messages": [{"role": "assistant", "content": "Hello there!"}]}, "no user turn"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hi"}]}, "no user turn"),
    ],
)
def test_more_bad_row_kinds_are_named(tmp_path, bad_row, reason):
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), _chat(1), bad_row])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(2)])
    with pytest.raises(BadRowsError) as err:
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    assert f"{tmp_path}/train.jsonl:3: {reason.format(tmp_path)}" in str(err.value)
    assert "bad_rows='drop'" in str(err.value)


def test_drop_policy_trains_without_bad_rows_and_counts_them_by_reason(tmp_path):
    bad = [
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        _chat(0),
    ]
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), _chat(1), *bad, _chat(2)])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(3)])
    ref = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), bad_rows="drop"))
    assert ref.rows == {"train": 3, "test": 1}
    assert ref.dropped["train"] == {
        "`messages` is empty": 1, "messages[i].role is not a known role": 2, "duplicate row": 1,
    }
    assert ref.dropped["test"] == {}


def test_rows_that_break_the_table_schema_get_a_clear_error(tmp_path):
    # Arrow can't hold both in one column; smolflow re-reads such JSON value by value, so the
    # row checks name the row (and data.bad_rows='drop' can drop it).
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), {"messages": "hi"}])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(2)])
    with pytest.raises(BadRowsError) as err:
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    assert "train.jsonl:2: `messages` is a str, not a list" in str(err.value) and "bad_rows='drop'" in str(err.value)


def test_a_line_that_is_not_json_is_one_bad_row_not_a_lost_file(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(_chat(0)) + "\n{not json\n" + json.dumps(_chat(1)) + "\n")
    _write_jsonl(tmp_path / "test.jsonl", [_chat(2)])
    with pytest.raises(BadRowsError, match=r"1 bad row\(s\) in split 'train': \S+/train.jsonl:2: not valid JSON \("):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    ref = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), bad_rows="drop"))
    assert ref.rows == {"train": 2, "test": 1} and ref.dropped["train"] == {"not valid JSON": 1}


def test_a_key_written_twice_is_a_bad_row_not_a_silently_lost_value(tmp_path):
    # json keeps the last of two equal keys; the first value (here the user's real question) would vanish.
    twice = '{"messages": [{"role": "user", "content": "lost", "content": "kept"}, {"role": "assistant", "content": "a"}]}'
    (tmp_path / "train.jsonl").write_text(json.dumps(_chat(0)) + "\n" + twice + "\n" + json.dumps(_chat(1)) + "\n")
    _write_jsonl(tmp_path / "test.jsonl", [_chat(2)])
    with pytest.raises(BadRowsError, match=r"1 bad row\(s\) in split 'train': \S+/train.jsonl:2: key 'content' twice "
                                           r"in one object \(JSON readers keep only the last value; write each key once\)"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    ref = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), bad_rows="drop"))
    assert ref.rows == {"train": 2, "test": 1} and ref.dropped["train"] == {"a key twice in one object": 1}
    # A JSON array file: datasets' own loader would keep the last `messages` ([]) without a word.
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "train.json").write_text("[\n" + json.dumps(_chat(0)) + ",\n"
                                         '{"messages": [{"role": "user", "content": "hi"}], "messages": []}\n]\n')
    with pytest.raises(BadRowsError, match=r"train.json row 2: key 'messages' twice in one object"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))


def _ids(ref, split="train"):
    from datasets import load_from_disk

    return [row["messages"][0]["content"] for row in load_from_disk(ref.path)[split]]


def test_shuffle_with_a_seed_picks_the_same_rows_before_the_limit(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [_chat(i) for i in range(40)])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(i) for i in range(40, 44)])
    unshuffled = _ids(load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), max_train_rows=5)))
    assert unshuffled == [f"hi {i}" for i in range(5)]
    picks = [_ids(load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), max_train_rows=5, shuffle=True, seed=s)))
             for s in (7, 7, 8)]
    assert picks[0] == picks[1]  # same seed, same rows in the same order
    assert picks[0] != picks[2] and picks[0] != unshuffled  # the limit samples the whole split
    assert set(picks[0]) <= {f"hi {i}" for i in range(40)} and len(set(picks[0])) == 5


def test_after_a_shuffle_bad_rows_are_named_by_their_place_in_the_file(tmp_path):
    rows = [_chat(i) for i in range(40)]
    rows[17] = {"messages": [{"role": "user", "content": "only a question"}]}
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", [_chat(50)])
    with pytest.raises(BadRowsError, match=r"train.jsonl:18: no assistant turn"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), shuffle=True, seed=3))


TOOL_ROW = {"messages": [
    {"role": "user", "content": "What's 123 * 456?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"x": 123, "y": 456}}}]},
    {"role": "tool", "name": "calculator", "content": "56088"},
    {"role": "assistant", "content": "It is 56088."},
]}
PARTS_ROW = {"messages": [
    {"role": "user", "content": [{"type": "text", "text": "What's in this image?"},
                                 {"type": "image", "image_url": "https://example.com/image.jpg"}]},
    {"role": "assistant", "content": "A cat."},
]}


def test_tool_calls_tool_replies_and_parts_are_accepted_and_counted(tmp_path):
    from datasets import load_from_disk

    # Plain rows first: datasets' JSON loader fixes its schema from them (and fails on the later
    # tool call), so the loader re-reads the messages as JSON values.
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), _chat(1), TOOL_ROW, PARTS_ROW])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(2), PARTS_ROW])
    ref = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    assert ref.rows == {"train": 4, "test": 2}
    assert ref.shapes == {"tool_calls": 1, "tool_messages": 1, "multimodal": 2}
    saved = load_from_disk(ref.path)["train"]
    assert saved[2]["messages"] == TOOL_ROW["messages"] and saved[3]["messages"] == PARTS_ROW["messages"]


def test_parts_after_plain_rows_are_not_turned_into_strings(tmp_path):
    # Read first, train-0 fixes `content` as a string: datasets would cast train-1's parts to the
    # JSON *string* '[{"type":"text",...}]' and train on that text. (Splits are read one by one
    # for the same reason.)
    _write_jsonl(tmp_path / "train-0.jsonl", [_chat(0)])
    _write_jsonl(tmp_path / "train-1.jsonl", [PARTS_ROW])
    _write_jsonl(tmp_path / "test.jsonl", [PARTS_ROW, _chat(2)])
    ref = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    assert ref.shapes["multimodal"] == 2
    assert _ids(ref)[1] == _ids(ref, "test")[0] == PARTS_ROW["messages"][0]["content"]


def test_null_fields_arrow_adds_are_not_part_of_the_conversation(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_from_disk

    from tasks.data import as_written

    # Parquet holds one schema per file: plain turns get `tool_calls: null`, image parts `text: null`.
    answer = {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}
    parts_only = {"messages": [PARTS_ROW["messages"][0], answer]}
    for split, rows in (("train", [_chat(0), TOOL_ROW]), ("test", [parts_only])):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{split}-00000.parquet")
    ref = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    saved = load_from_disk(ref.path)
    assert saved["train"][0]["messages"][0]["tool_calls"] is None  # what Arrow made of it
    assert saved["test"][0]["messages"][0]["content"][1]["text"] is None
    assert [as_written(saved["train"][i]["messages"]) for i in range(2)] == [_chat(0)["messages"], TOOL_ROW["messages"]]
    assert as_written(saved["test"][0]["messages"]) == parts_only["messages"]
    assert ref.shapes == {"tool_calls": 1, "tool_messages": 1, "multimodal": 1}


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]},
                       {"role": "assistant", "content": "x"}]},
         "messages[0].content[0] has type 'audio', expected a part"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}, {"type": "image"}]},
                       {"role": "assistant", "content": "x"}]},
         "messages[0].content[0] is a text part without text"),
        ({"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "", "tool_calls": [{"name": "calc", "args": {"x": 1}}]}]},
         "messages[1].tool_calls[0] is not {type: 'function', function: {name, arguments}} nor the seed's "
         "{tool: name, parameters: {...}}"),
        ({"messages": [{"role": "user", "content": "hi",
                        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                       {"role": "assistant", "content": "x"}]},
         "messages[0] has tool_calls but role 'user'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
         "messages[1].content is empty or not a string"),
    ],
)
def test_bad_tool_calls_and_parts_are_named(tmp_path, bad_row, reason):
    _assert_bad_row_named(tmp_path, bad_row, reason)


def test_unchanged_data_is_checked_once(tmp_path, monkeypatch):
    from tasks import data

    _write_jsonl(tmp_path / "train.jsonl", [_chat(i) for i in range(4)])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(9)])
    first = load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), bad_rows="drop"))
    def tripwire(batch, **kwargs):
        raise AssertionError("checked again")

    monkeypatch.setattr(data, "_check_batch", tripwire)
    assert load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), bad_rows="drop")) == first
    # Other settings or changed files are checked afresh.
    with pytest.raises(AssertionError, match="checked again"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), bad_rows="drop", max_train_rows=2))
    _write_jsonl(tmp_path / "train.jsonl", [_chat(i) for i in range(5)])
    with pytest.raises(AssertionError, match="checked again"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path), bad_rows="drop"))


def test_prompt_completion_pairs_become_conversations_and_are_checked(tmp_path):
    from datasets import load_from_disk

    folder = tmp_path
    _write_jsonl(folder / "train.jsonl", [{"prompt": "What is 2+2?", "completion": "4"},
                           {"prompt": "Capital of France?", "completion": "Paris."}])
    _write_jsonl(folder / "test.jsonl", [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                           "completion": [{"role": "assistant", "content": "Hello!"}]}])
    ref = load_chat_dataset.fn(DataConfig(dataset=str(folder)))
    saved = load_from_disk(ref.path)
    assert [m["role"] for m in saved["train"][0]["messages"]] == ["user", "assistant"]
    assert saved["train"][1]["messages"][1]["content"] == "Paris."
    assert [m["role"] for m in saved["test"][0]["messages"]] == ["system", "user", "assistant"]

    _write_jsonl(folder / "train.jsonl", [{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Empty answer?", "completion": ""}])
    with pytest.raises(BadRowsError, match=r"split 'train': \S+/train.jsonl:2: messages\[1\]\.content is empty"):
        load_chat_dataset.fn(DataConfig(dataset=str(folder)))


def test_an_unchanged_check_is_found_without_importing_datasets(tmp_path):
    """A cached re-run reads no dataset, so its data check is found from the files' sizes and
    times alone (importing datasets was ~1 s of a ~9 s re-run); a changed file is read afresh."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _write_jsonl(tmp_path / "train.jsonl", [_chat(i) for i in range(4)])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(9)])
    code = ("import json, sys; from tasks.config import DataConfig; from tasks.data import load_chat_dataset; "
            f"ref = load_chat_dataset.fn(DataConfig(dataset={str(tmp_path)!r})); "
            "print(json.dumps({'datasets': 'datasets' in sys.modules, 'ref': ref.model_dump(mode='json')}))")
    root = str(Path(__file__).resolve().parents[1])

    def fresh_process() -> dict:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                              env=os.environ | {"PYTHONPATH": root})
        return json.loads(done.stdout.splitlines()[-1])

    first, second = fresh_process(), fresh_process()
    assert first["datasets"] and not second["datasets"]
    assert first["ref"] == second["ref"] and second["ref"]["rows"] == {"train": 4, "test": 1}
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), {"messages": []}])
    with pytest.raises(BadRowsError, match="train"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
