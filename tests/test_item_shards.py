"""Item shards (`execution.item_shards`): GSM8K, MATH and HumanEval scored as n parts of every n-th
item give, merged, exactly the whole run's result: records (prompts with their few-shot examples,
outputs), score, stderr, every metric and the comparability key."""

import json

import pytest
from pydantic import ValidationError

from tasks.benchmarks import REGISTRY
from tasks.config import BenchmarkConfig, ExecutionConfig
from tasks.evaluation import _jobs, merge_shards, run_benchmark
from tasks.ray_scoring import submission_order, work
from tests.test_benchmarks import AnswerKey


class SomeRight(AnswerKey):
    """The gold solution for most items, a wrong answer for every 4th: parts of 3 each get both."""

    def generate_until(self, requests):
        self.asked = getattr(self, "asked", []) + [r.doc_id for r in requests]
        return ["So the answer is 12345." if r.doc_id % 4 == 0 else r.doc.get("solution") or r.doc["answer"]
                for r in requests]


def _same(merged, whole):
    assert merged.records == whole.records  # prompts too: the few-shot examples drawn for each item
    assert (merged.n, merged.score, merged.stderr) == (whole.n, whole.score, whole.stderr)
    assert merged.metrics == whole.metrics
    assert merged.comparability_key == whole.comparability_key


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_lm_eval_parts_merge_into_the_whole_run(name):
    bench, cfg = REGISTRY[name], BenchmarkConfig(name=name, limit=None, data="fixture")
    whole = bench.evaluate_lm(SomeRight(right=True), cfg)
    lms = [SomeRight(right=True) for _ in range(3)]
    parts = [bench.evaluate_lm(lm, cfg, (k, 3)) for k, lm in enumerate(lms)]
    assert 0 < whole.score < 1
    # each part asked the model for its own items only, and reports only those
    assert [sorted(lm.asked) for lm in lms] == [list(range(k, whole.n, 3)) for k in range(3)]
    assert [[r["doc_id"] for r in p.records] for p in parts] == [list(range(k, whole.n, 3)) for k in range(3)]
    assert parts[1].settings["part"] == "items 1, 4, 7, ... (shard 2 of 3)"
    assert parts[0].score == sum(r["correct"] for r in parts[0].records) / parts[0].n  # its own items' mean
    samples = next(t for f, t in parts[1].lm_eval_files.items() if f.startswith("samples_"))
    assert {json.loads(line)["doc_id"] for line in samples.splitlines()} == set(range(1, whole.n, 3))
    merged = merge_shards(parts)
    _same(merged, whole)
    assert merged.settings["shards"] == 3 and "part" not in merged.settings
    assert len([f for f in merged.lm_eval_files if "results_" in f]) == 3  # each part's own lm-eval files


def test_humaneval_parts_merge_into_the_whole_run(tiny_ref):
    cfg = BenchmarkConfig(name="humaneval", limit=5, batch_size=2)
    whole = run_benchmark.fn(tiny_ref, cfg)
    parts = [run_benchmark.fn(tiny_ref, cfg, part=(k, 2)) for k in range(2)]
    assert [p.n for p in parts] == [3, 2]
    _same(merge_shards(parts), whole)


def test_item_shards_split_only_benchmarks_without_subsets():
    benchmarks = [BenchmarkConfig(name="gsm8k", limit=20), BenchmarkConfig(name="math", limit=2),
                  BenchmarkConfig(name="mmlu", limit=3, subsets=["astronomy"])]
    jobs = _jobs(benchmarks, [], None, None, 4)
    assert [(n, p.get("part")) for n, _, p in jobs] == [
        ("gsm8k", (0, 4)), ("gsm8k", (1, 4)), ("gsm8k", (2, 4)), ("gsm8k", (3, 4)),
        ("math", (0, 2)), ("math", (1, 2)),  # never more parts than items
        ("mmlu", None)]
    assert work(jobs[0][2]) == work({"cfg": benchmarks[0]}) / 4
    assert [jobs[i][0] for i in submission_order(jobs)][:1] == ["gsm8k"]  # 20 x 7 / 4 = 35 > math's 2 x 6 / 2
    with pytest.raises(ValidationError, match="execution.item_shards: it needs execution.task_runner 'ray'"):
        ExecutionConfig(item_shards=4)


def test_validate_lists_the_tasks_each_benchmark_becomes_on_ray():
    from tasks.checks import plan
    from tasks.config import RunConfig

    config = RunConfig.model_validate({
        "execution": {"task_runner": "ray", "shard_size": 1, "item_shards": 4},
        "benchmarks": [{"name": "gsm8k", "limit": 20}, {"name": "mmlu", "limit": 3, "subsets": ["astronomy", "high_school_biology"]},
                       {"name": "math", "limit": 1}]})
    steps = plan(config)
    assert "benchmark-gsm8k (base, 4 tasks on Ray)" in steps and "benchmark-mmlu (tuned, 2 tasks on Ray)" in steps
    assert "benchmark-math (base, on Ray)" in steps  # one item: one task
    assert "benchmark-gsm8k (base)" in plan(RunConfig.model_validate({"benchmarks": [{"name": "gsm8k"}]}))
