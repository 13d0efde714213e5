"""Data stage: shipped fixture, local files, and clear errors for bad rows and bad sources."""

import json

import pytest

from flows.config import DataConfig
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
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), _chat(1), bad_row])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(2)])
    with pytest.raises(BadRowsError) as err:
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    assert "split 'train'" in str(err.value) and "row 2" in str(err.value) and reason in str(err.value)


def test_missing_messages_column_says_which_schema(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(BadRowsError, match="no `messages` column"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))


def test_missing_split_names_the_parameter(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0)])
    with pytest.raises(ValueError, match=r"data.test_split='test' is not in the dataset"):
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))


def test_hub_id_offline_explains_how_to_use_local_files():
    with pytest.raises(RuntimeError) as err:
        load_chat_dataset.fn(DataConfig(dataset="HuggingFaceTB/smoltalk"))
    assert "HF_HUB_OFFLINE" in str(err.value) and "local files" in str(err.value)


def test_nonexistent_local_path_is_named():
    with pytest.raises(ValueError, match="no such file or directory"):
        load_chat_dataset.fn(DataConfig(dataset="./does/not/exist"))


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]},
         "a system message that is not first"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
         "messages[0] and messages[1] are both 'user' turns"),
        (_chat(0), "duplicate of row 0"),
    ],
)
def test_more_bad_row_kinds_are_named(tmp_path, bad_row, reason):
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), _chat(1), bad_row])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(2)])
    with pytest.raises(BadRowsError) as err:
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    assert "row 2" in str(err.value) and reason in str(err.value) and "bad_rows='drop'" in str(err.value)


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
    _write_jsonl(tmp_path / "train.jsonl", [_chat(0), {"messages": "hi"}])
    _write_jsonl(tmp_path / "test.jsonl", [_chat(2)])
    with pytest.raises(BadRowsError) as err:
        load_chat_dataset.fn(DataConfig(dataset=str(tmp_path)))
    assert "could not read" in str(err.value) and "make every row's `messages` such a list" in str(err.value)
