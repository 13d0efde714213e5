"""Built-in benchmark data: bad rows are refused before any compute, named file:line; `smolflow
validate` lists each problem once; a judge_rubric custom benchmark needs judge.enabled."""

import json

import pytest

from tasks.benchmarks import REGISTRY
from tasks.config import BenchmarkConfig, RunConfig

ROW = {"question": "x", "subject": "astronomy", "choices": ["a", "b", "c", "d"], "answer": 1}


def _mmlu(tmp_path, bad: dict) -> BenchmarkConfig:
    # line 2 is blank: the line number an editor shows counts it
    lines = [json.dumps(ROW), "", json.dumps(ROW | bad)]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    return BenchmarkConfig(name="mmlu", data=str(tmp_path), subsets=["astronomy"], limit=5)


@pytest.mark.parametrize("bad", [{"answer": 7}, {"answer": -1}, {"answer": True}, {"choices": ["a", "b", 3, "d"]}])
def test_mmlu_answer_out_of_range_or_non_string_choices_named_by_file_and_line(tmp_path, bad):
    # answer 7 passed validation, then failed as an IndexError inside lm-eval mid-evaluation.
    with pytest.raises(ValueError, match=r"test\.jsonl:3: need `choices` \(4 strings\) and `answer` \(int 0-3"):
        REGISTRY["mmlu"].check(_mmlu(tmp_path, bad))


def test_bbh_and_gsm8k_rows_named_by_line(tmp_path):
    bbh = tmp_path / "bbh"
    bbh.mkdir()
    (bbh / "web_of_lies.jsonl").write_text(json.dumps({"input": "q", "target": "Yes"}) + "\n" + json.dumps({"input": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"web_of_lies\.jsonl:2: need string field"):
        REGISTRY["bbh"].check(BenchmarkConfig(name="bbh", data=str(bbh)))
    gsm = tmp_path / "gsm8k"
    gsm.mkdir()
    (gsm / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:2: need string field\(s\) `question`, `answer`; missing or not a string: answer"):
        REGISTRY["gsm8k"].data_files(BenchmarkConfig(name="gsm8k", data=str(gsm)))


def test_validate_reports_a_benchmark_data_problem_once_and_suggests_fixture(monkeypatch):
    from tasks.checks import validate_everything

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = RunConfig(data={"dataset": "fixture:everyday-conversations"},
                       benchmarks=[{"name": "gsm8k", "data": "fixtur", "limit": 1}])
    problems, _ = validate_everything(config)
    named = [p for p in problems if "fixtur'" in p]
    assert len(named) == 1, problems
    assert "did you mean 'fixture'?" in named[0]


def test_judge_rubric_custom_benchmark_refused_when_the_judge_is_disabled(tmp_path):
    from tasks.benchmarks.custom import CustomBenchmarkError
    from tasks.checks import check_benchmark_data

    (tmp_path / "items.jsonl").write_text('{"prompt": "Capital of France?", "answer": "Paris"}\n')
    (tmp_path / "bench.yaml").write_text("name: capitals\ndata: items.jsonl\nprompt_field: prompt\nanswer_field: answer\n"
                                         "scorer: judge_rubric\nscorer_args:\n  rubric: Names the city.\n")
    off = RunConfig(benchmarks=[], custom_benchmarks=[str(tmp_path / "bench.yaml")], judge={"enabled": False})
    with pytest.raises(CustomBenchmarkError, match=r"custom_benchmarks\[0\] .*judge\.enabled is false; set judge\.enabled: true"):
        check_benchmark_data(off)
    check_benchmark_data(off.model_copy(update={"judge": off.judge.model_copy(update={"enabled": True})}))


def test_fixture_provenance_counts_its_test_items():
    from tasks.benchmarks.provenance import provenance

    files = REGISTRY["mmlu"].data_files(BenchmarkConfig(name="mmlu", data="fixture"))
    source = provenance("mmlu", REGISTRY["mmlu"].hub, "fixture", files, True, True)
    assert source["test_items"] == sum(1 for line in open(files["test"]) if line.strip()) > 0
