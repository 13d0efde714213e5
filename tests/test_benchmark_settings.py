"""Issue 14: every benchmark setting honoured, few-shot examples never scored items, JSONL read by
"\\n", lm-eval's own per-item metrics and files, provenance, and like compared with like.

Rows are shaped like the real files (cais/mmlu "all", openai/gsm8k main, lukaemon/bbh); the model
is an lm-eval `LM` answering from each item's gold (or wrongly), so lm-eval's own prompt building,
filters and metrics are what is under test.
"""

import json

import pytest
from lm_eval.api.model import LM
from pydantic import ValidationError

from tasks.benchmarks import REGISTRY
from tasks.benchmarks.provenance import FIXTURE_NOTE
from tasks.config import BenchmarkConfig, RunConfig
from tests.test_benchmarks import AnswerKey

ALGEBRA = [  # cais/mmlu abstract_algebra-shaped rows (hand-written)
    ("Find the order of the element 2 in Z_5 under addition.", ["1", "2", "5", "10"], 2),
    ("How many elements does the symmetric group S_3 have?", ["3", "6", "9", "12"], 1),
    ("Is Z_4 a field?", ["Yes", "No, 2 has no inverse", "Only for addition", "It is empty"], 1),
    ("What is the identity of (Z, +)?", ["1", "-1", "0", "2"], 2),
    ("How many generators does Z_6 have?", ["1", "2", "3", "6"], 1),
    ("What is the characteristic of Z_7?", ["0", "1", "7", "49"], 2),
    ("What is the order of the group Z_2 x Z_3?", ["2", "3", "5", "6"], 3),
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _mmlu_dir(tmp_path, dev=5, test=2, subject="abstract_algebra", test_rows=None):
    folder = tmp_path / "mmlu"
    folder.mkdir(exist_ok=True)
    rows = [{"question": q, "subject": subject, "choices": c, "answer": a} for q, c, a in ALGEBRA]
    if dev:
        _write(folder / "dev.jsonl", rows[:dev])
    _write(folder / "test.jsonl", test_rows or rows[5:5 + test])
    return folder


class GoldOrWrong(AnswerKey):
    """AnswerKey, plus MMLU's letters and the answer formats of GSM8K ('#### N' / 'The answer is N.')
    and BBH chain of thought."""

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            letter = r.arguments[1].strip()
            if len(letter) == 1 and letter in "ABCD":  # lettered MMLU: " A".." D" after "Answer:"
                is_gold = "ABCD".index(letter) == r.doc["answer"]
                out.append((0.0, True) if is_gold == self.right else (-50.0, False))
            else:
                out += super().loglikelihood([r])
        return out

    def generate_until(self, requests):
        out = []
        for r in requests:
            if "answer" in r.doc:  # GSM8K: the gold's number, in both stock formats
                n = r.doc["answer"].split("####")[-1].strip() if self.right else "99999"
                out.append(f"So it is {n}.\n#### {n}\nThe answer is {n}.")
            elif "Let's think step by step" in r.arguments[0]:
                out.append(f"Step by step. So the answer is {r.doc['target'] if self.right else 'not it'}.")
            else:
                out += super().generate_until([r])
        return out


# 4. JSONL lines are split at "\n" only; a broken line is named file:line.
def test_rows_holding_u0085_and_u2028_are_read_and_a_broken_line_is_named(tmp_path):
    tricky = {"question": "Which ring is\u0085 a field?\u2028(one line in the file)", "subject": "abstract_algebra",
              "choices": ["Z_4", "Z_5", "Z_6", "Z_8"], "answer": 1}
    folder = _mmlu_dir(tmp_path, dev=0, test_rows=[tricky, {**tricky, "question": "Plain?"}])
    result = REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="mmlu", data=str(folder), limit=None))
    assert result.n == 2 and result.score == 1.0
    assert "\u0085 a field?\u2028(one line" in result.records[0]["prompt"]
    with open(folder / "test.jsonl", "a") as f:
        f.write('{"question": "cut off\n')
    with pytest.raises(ValueError, match=r"mmlu/test\.jsonl:3: not valid JSON"):
        REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="mmlu", data=str(folder)))
    lines = (folder / "test.jsonl").read_text().split("\n")
    (folder / "test.jsonl").write_text(lines[0] + "\n" + lines[1].replace('"answer": 1', '"answer": 0, "answer": 1') + "\n")
    with pytest.raises(ValueError, match=r"mmlu/test\.jsonl:2: key 'answer' twice in one object"):
        REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="mmlu", data=str(folder)))


# 1. MMLU's lettered format, 5-shot from the dev split; num_fewshot is honoured and recorded.
def test_five_shot_lettered_mmlu_prompt_holds_the_five_dev_examples(tmp_path):
    folder = _mmlu_dir(tmp_path)
    cfg = BenchmarkConfig(name="mmlu", format="mcq", num_fewshot=5, subsets=["abstract_algebra"], data=str(folder), limit=10)
    right = REGISTRY["mmlu"].evaluate_lm(GoldOrWrong(right=True), cfg)
    prompt = right.records[0]["prompt"]
    assert prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    for question, _, _ in ALGEBRA[:5]:
        assert prompt.count(question) == 1
    assert ALGEBRA[6][0] not in prompt  # the other test item is never an example
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith("A. 0\nB. 1\nC. 7\nD. 49\nAnswer:")
    assert right.metric == "acc,none" and right.score == 1.0 and right.n == 2
    s = right.settings
    assert (s["num_fewshot"], s["format"], s["stock_task"]) == (5, "mcq", "mmlu/default/mmlu_{subset}.yaml")
    assert s["fewshot"]["source"] == "dev split" and s["fewshot"]["ids"] == [0, 1, 2, 3, 4]
    wrong = REGISTRY["mmlu"].evaluate_lm(GoldOrWrong(right=False), cfg)
    assert wrong.score == 0.0 and {r["extracted"] for r in right.records} <= set("ABCD")
    assert wrong.comparability_key == right.comparability_key  # same items and settings, another run


def test_mmlu_cloze_num_fewshot_is_honoured_not_pinned_to_zero(tmp_path):
    folder = _mmlu_dir(tmp_path)
    result = REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="mmlu", num_fewshot=2, data=str(folder)))
    prompt = result.records[0]["prompt"]
    assert result.settings["num_fewshot"] == 2 and result.settings["format"] == "cloze"
    assert prompt.count("Question: ") == 3 and ALGEBRA[0][0] in prompt and ALGEBRA[1][0] in prompt
    assert ALGEBRA[2][0] not in prompt and result.metric == "acc_norm,none"


def test_few_shot_without_an_example_source_is_refused_naming_the_field(tmp_path):
    from tasks.checks import ConfigError, check_run

    folder = _mmlu_dir(tmp_path, dev=0)  # test.jsonl only: the examples could only be scored items
    cfg = BenchmarkConfig(name="mmlu", num_fewshot=5, data=str(folder))
    with pytest.raises(ValueError, match=r"benchmarks\[mmlu\]\.num_fewshot=5: the data \(abstract_algebra\) has no train/dev split"):
        REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=True), cfg)
    with pytest.raises(ConfigError, match=r"benchmarks\[0\] \(mmlu\): benchmarks\[mmlu\]\.num_fewshot=5"):
        check_run(RunConfig(benchmarks=[cfg], judge={"enabled": False}))
    (tmp_path / "few").mkdir()
    few = _mmlu_dir(tmp_path / "few", dev=3)
    with pytest.raises(ValueError, match=r"num_fewshot=5: the dev split \(abstract_algebra\) has only 3 rows"):
        REGISTRY["mmlu"].check(BenchmarkConfig(name="mmlu", num_fewshot=5, data=str(few)))
    with pytest.raises(ValueError, match=r"only 3 fixed examples"):
        REGISTRY["bbh"].check(BenchmarkConfig(name="bbh", num_fewshot=4, subsets=["web_of_lies"], data="fixture"))


# 3. GSM8K with only test.jsonl: the examples are lm-eval's fixed exemplars, never test items.
def test_gsm8k_folder_with_only_test_jsonl_takes_no_examples_from_the_test_items(tmp_path):
    from tasks.runtime import FIXTURES

    folder = tmp_path / "gsm8k"
    folder.mkdir()
    test_rows = [json.loads(line) for line in (FIXTURES / "gsm8k" / "test.jsonl").read_text().split("\n") if line][:6]
    _write(folder / "test.jsonl", test_rows)
    cfg = BenchmarkConfig(name="gsm8k", data=str(folder), limit=None)
    result = REGISTRY["gsm8k"].evaluate_lm(GoldOrWrong(right=True), cfg)
    assert result.n == 6 and result.score == 1.0
    for record, row in zip(result.records, test_rows):
        for other in test_rows:
            assert (other["question"] in record["prompt"]) == (other is row)  # only the item itself
    s = result.settings
    assert s["stock_task"] == "gsm8k/gsm8k-cot.yaml" and s["num_fewshot"] == 8
    assert s["fewshot"]["source"] == "fixed examples shipped with the stock task" and s["fewshot"]["ids"] == list(range(8))
    assert result.records[0]["prompt"].startswith("Q: There are 15 trees in the grove.")
    assert result.provenance["comparable_to_published"] is False  # not the 5-shot reference setting


def test_gsm8k_gold_scores_100_and_wrong_answers_0():
    cfg = BenchmarkConfig(name="gsm8k", data="fixture", limit=8)
    right = REGISTRY["gsm8k"].evaluate_lm(GoldOrWrong(right=True), cfg)
    wrong = REGISTRY["gsm8k"].evaluate_lm(GoldOrWrong(right=False), cfg)
    assert right.n == wrong.n == 8 and right.score == 1.0 and wrong.score == 0.0
    assert all(r["correct"] and r["metrics"] == {"exact_match": 1.0} for r in right.records)
    assert right.settings["num_fewshot"] == 5 and right.settings["fewshot"]["source"] == "train split"
    assert right.records[0]["prompt"].count("Question: ") == 6  # 5 train examples + the item


def test_lm_evals_results_record_smolflows_commit_and_git_says_nothing(tmp_path, monkeypatch, capfd):
    """Started outside any git repository, an evaluation printed git's 'fatal: not a git
    repository' (lm-eval asks git about the working directory); the results carry smolflow's commit."""
    from tasks.evaluation import save_scores
    from tasks.runtime import git_commit

    monkeypatch.chdir(tmp_path)
    result = REGISTRY["gsm8k"].evaluate_lm(GoldOrWrong(right=True), BenchmarkConfig(name="gsm8k", data="fixture", limit=2))
    assert "not a git repository" not in capfd.readouterr().err
    save_scores.fn(str(tmp_path / "run"), {"gsm8k": {"model": result}})
    (results,) = (tmp_path / "run" / "benchmarks" / "gsm8k" / "lm-eval" / "model").glob("results_*.json")
    assert json.loads(results.read_text())["git_hash"] == git_commit() is not None


def test_bbh_chain_of_thought_variant():
    cfg = BenchmarkConfig(name="bbh", variant="cot", subsets=["web_of_lies"], data="fixture")
    right = REGISTRY["bbh"].evaluate_lm(GoldOrWrong(right=True), cfg)
    wrong = REGISTRY["bbh"].evaluate_lm(GoldOrWrong(right=False), cfg)
    assert right.score == 1.0 and wrong.score == 0.0 and right.metric == "exact_match,get-answer"
    assert right.records[0]["prompt"].count("Let's think step by step.") == 4  # 3 shots + the item
    s = right.settings
    assert s["variant"] == "cot" and s["stock_task"] == "bbh/cot_fewshot/{subset}.yaml" and s["num_fewshot"] == 3
    assert s["generation_kwargs"]["max_gen_toks"] == 1024


def test_settings_that_would_be_ignored_are_rejected_naming_the_field():
    with pytest.raises(ValidationError, match="format: only mmlu has a format"):
        BenchmarkConfig(name="gsm8k", format="mcq")
    with pytest.raises(ValidationError, match="variant: only bbh has a variant"):
        BenchmarkConfig(name="mmlu", variant="cot")
    with pytest.raises(ValidationError, match="num_fewshot: humaneval is 0-shot"):
        BenchmarkConfig(name="humaneval", num_fewshot=3)
    with pytest.raises(ValidationError, match="format"):
        BenchmarkConfig(name="mmlu", format="letters")


# 5. Per-item records carry lm-eval's own per-document metrics, and agree with `correct`.
class Skewed(LM):
    """Log-likelihoods where lm-eval's acc_norm (per character) and a per-byte normalisation disagree."""

    LL = {"ééé": -3.3, "abcd": -4.0, "zzzzzzzzzz": -30.0, "yyyyyyyyyy": -30.0}

    def loglikelihood(self, requests):
        return [(self.LL[r.arguments[1].strip()], False) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


def test_per_item_records_carry_lm_evals_own_metrics(tmp_path):
    row = {"question": "Which string?", "subject": "abstract_algebra", "choices": ["ééé", "abcd", "zzzzzzzzzz", "yyyyyyyyyy"]}
    folder = _mmlu_dir(tmp_path, dev=0, test_rows=[row | {"answer": 1}, row | {"answer": 0}])
    result = REGISTRY["mmlu"].evaluate_lm(Skewed(), BenchmarkConfig(name="mmlu", data=str(folder), limit=None))
    # per character: -3.3/3 = -1.1 < -4.0/4 = -1.0, so lm-eval's acc_norm picks "abcd" (per byte it would be "ééé")
    first, second = result.records
    assert first["extracted"] == second["extracted"] == "abcd"
    assert first["metrics"] == {"acc": 0.0, "acc_norm": 1.0} and first["correct"] is True
    assert second["metrics"] == {"acc": 1.0, "acc_norm": 0.0} and second["correct"] is False
    assert all((r["extracted"] == r["gold"]) == r["correct"] == bool(r["metrics"]["acc_norm"]) for r in result.records)


def test_lm_evals_own_files_are_written_and_read_by_its_tooling(tmp_path):
    from datasets import load_dataset
    from lm_eval.utils import get_latest_filename, get_results_filenames, get_sample_results_filenames

    folder = _mmlu_dir(tmp_path)
    cfg = BenchmarkConfig(name="mmlu", format="mcq", num_fewshot=5, subsets=["abstract_algebra"], data=str(folder), limit=10)
    result = REGISTRY["mmlu"].evaluate_lm(GoldOrWrong(right=True), cfg)
    from tasks.evaluation import save_scores

    save_scores.fn(str(tmp_path / "run"), {"mmlu": {"model": result}})  # as `smolflow eval` stores a score
    out = tmp_path / "run" / "benchmarks" / "mmlu" / "lm-eval" / "model"
    paths = [str(p) for p in sorted(out.iterdir())]
    results = json.loads(open(get_latest_filename(get_results_filenames(paths))).read())
    task = "smolflow_mmlu_abstract_algebra"
    assert results["results"][task]["acc,none"] == result.score == 1.0
    assert results["n-shot"][task] == 5 and results["configs"][task]["num_fewshot"] == 5
    (samples_file,) = get_sample_results_filenames(paths)
    # As lm-eval's hub tooling loads them (its Arrow copy in tmp_path, not in datasets' cache for good).
    samples = load_dataset("json", data_files=samples_file, split="train", cache_dir=str(tmp_path / "arrow"))
    assert samples.num_rows == 2 and list(samples["acc"]) == [1.0, 1.0]
    assert "lm_eval_files" not in result.model_dump()  # not in summary.json; the caller stores the files


# 6. Every score says where its items came from; fixture scores say they are not comparable.
def test_fixture_scores_carry_their_provenance(caplog):
    import logging

    from tasks.benchmarks import provenance

    provenance._logged_fixture.clear()
    with caplog.at_level(logging.WARNING, logger="smolflow"):
        a = REGISTRY["gsm8k"].evaluate_lm(GoldOrWrong(right=True), BenchmarkConfig(name="gsm8k", data="fixture", limit=2))
        REGISTRY["bbh"].evaluate_lm(GoldOrWrong(right=True), BenchmarkConfig(name="bbh", data="fixture", limit=1, subsets=["web_of_lies"]))
    assert a.provenance["source"] == "fixture" and a.provenance["comparable_to_published"] is False
    assert a.provenance["note"] == FIXTURE_NOTE == a.settings["provenance"]
    assert set(a.provenance["sha256"]) == {"test", "train"}
    assert sum(FIXTURE_NOTE in r.getMessage() for r in caplog.records) == 1  # once per run, not per benchmark


def test_a_limit_at_or_above_the_items_is_every_item_not_a_subset(tmp_path, monkeypatch):
    """`limit: 5000` on a full GSM8K mirror scores all 1319 items, the same items and key as no limit,
    yet its provenance said "a subset of the items (limit)" and comparable_to_published false, so
    `smolflow compare` and W&B showed two sources for one measurement. Here a 3-item folder stands
    for the full set."""
    from tasks.benchmarks import provenance
    from tasks.evaluation import merge_shards

    monkeypatch.setitem(provenance.FULL_SIZE, "gsm8k", 3)
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    row = lambda i: {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}  # noqa: E731
    _write(folder / "test.jsonl", [row(i) for i in range(3)])
    _write(folder / "train.jsonl", [row(i) for i in range(100, 106)])
    scored = {limit: REGISTRY["gsm8k"].evaluate_lm(GoldOrWrong(right=True), BenchmarkConfig(name="gsm8k", data=str(folder), limit=limit))
              for limit in (None, 3, 5000, 2)}
    assert {r.n for limit, r in scored.items() if limit != 2} == {3}
    assert len({scored[limit].comparability_key for limit in (None, 3, 5000)}) == 1
    for limit in (None, 3, 5000):
        assert scored[limit].provenance == scored[None].provenance and scored[limit].provenance["comparable_to_published"]
    assert [scored[limit].settings["left_out_by_limit"] for limit in (None, 3, 5000)] == [0, 0, 0]
    assert scored[2].settings["left_out_by_limit"] == 1 and not scored[2].provenance["comparable_to_published"]
    assert "a subset of the items (limit)" in scored[2].provenance["note"]
    # Item shards (Ray, execution.item_shards) merge into the same provenance.
    cfg = BenchmarkConfig(name="gsm8k", data=str(folder), limit=5000)
    merged = merge_shards([REGISTRY["gsm8k"].evaluate_lm(GoldOrWrong(right=True), cfg, part) for part in ((0, 2), (1, 2))])
    assert merged.comparability_key == scored[None].comparability_key and merged.provenance == scored[None].provenance


# 7. The gate and the trend compare like with like only.
def test_gate_does_not_compare_a_2_item_score_with_a_10_item_score():
    from tasks.gate import Score, decide

    key = AnswerKey(right=True)
    two = REGISTRY["mmlu"].evaluate_lm(key, BenchmarkConfig(name="mmlu", data="fixture", limit=1, subsets=["astronomy", "high_school_biology"]))
    ten = REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=False), BenchmarkConfig(name="mmlu", data="fixture", limit=None))
    assert (two.n, ten.n) == (2, 12) and two.comparability_key != ten.comparability_key
    d = decide({"mmlu": Score.of(ten)}, {"mmlu": Score.of(two)}, "base model")
    assert not d.promote and d.table[0]["delta"] is None  # a drop from 1.0 to 0.0, yet no evidence
    assert d.not_comparable[0].startswith("mmlu: not comparable (") and "different items, n 2 vs 12" in d.not_comparable[0]
    assert "no benchmark score is comparable" in d.reasons[0]
    assert decide({"mmlu": Score.of(ten)}, {"mmlu": Score.of(two)}, "x", allow_incomparable=True).promote
    again = REGISTRY["mmlu"].evaluate_lm(AnswerKey(right=True), BenchmarkConfig(name="mmlu", data="fixture", limit=None))
    same = decide({"mmlu": Score.of(ten)}, {"mmlu": Score.of(again)}, "x")
    assert again.comparability_key == ten.comparability_key and not same.promote and "mmlu dropped 1.0000" in same.reasons[0]


def test_gate_does_not_compare_a_bf16_score_with_an_fp32_score():
    # `execution.precision: auto` picks bf16 on CPUs with bf16 units and fp32 elsewhere, so two
    # nightlies on different machines can score in different precisions: bf16 picks differently
    # on some items, so such scores are not compared.
    from types import SimpleNamespace

    import torch

    from tasks.gate import Score, decide

    def scored(dtype, right):
        key = AnswerKey(right=right)
        key.model = SimpleNamespace(dtype=dtype, device=torch.device("cpu"))  # what evaluate_lm reads, as from HFLM.model
        return REGISTRY["mmlu"].evaluate_lm(key, BenchmarkConfig(name="mmlu", data="fixture", limit=1))

    fp32, bf16, fp32_again = scored(torch.float32, True), scored(torch.bfloat16, False), scored(torch.float32, False)
    assert (fp32.settings["dtype"], bf16.settings["dtype"]) == ("float32", "bfloat16")
    assert fp32.comparability["precision"] == "float32" and fp32.comparability_key != bf16.comparability_key
    d = decide({"mmlu": Score.of(bf16)}, {"mmlu": Score.of(fp32)}, "base model")
    assert not d.promote and d.table[0]["delta"] is None
    assert "precision float32 vs bfloat16" in d.not_comparable[0]
    same = decide({"mmlu": Score.of(fp32_again)}, {"mmlu": Score.of(fp32)}, "base model")
    assert fp32_again.comparability_key == fp32.comparability_key and "mmlu dropped" in same.reasons[0]


def test_a_reduced_precision_score_is_keyed_by_how_it_was_computed():
    # In bf16 the kernels' rounding depends on the CPU's units, the threads, the batch and which items
    # run together: on a Xeon with AMX, 19 of 50 MATH generations matched between a local run and Ray
    # item shards (docs/performance.md). In fp32 these moved no answer. So a bf16 score is compared
    # only with one computed the same way, and fp32 keys leave the arrangement out.
    from types import SimpleNamespace

    import torch

    from tasks.benchmarks.provenance import custom_provenance
    from tasks.device import kernels
    from tasks.evaluation import merge_shards
    from tasks.gate import Score, decide

    def scored(dtype, threads=1, batch_size=8, name="mmlu", part=None, **cfg):
        lm = AnswerKey(right=True)
        lm.model = SimpleNamespace(dtype=dtype, device=torch.device("cpu"))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return REGISTRY[name].evaluate_lm(lm, BenchmarkConfig(name=name, data="fixture", batch_size=batch_size, **cfg), part)
        finally:
            torch.set_num_threads(before)

    bf16, fp32 = torch.bfloat16, torch.float32
    one = scored(bf16, threads=1)
    assert one.settings["kernels"] == kernels("cpu") and one.settings["torch_threads"] == 1
    assert one.comparability["arrangement"] == {"kernels": kernels("cpu"), "torch_threads": 1, "batch_size": 8, "split": None}
    assert scored(bf16, threads=1).comparability_key == one.comparability_key  # a nightly compares with itself
    two = scored(bf16, threads=2)
    assert two.comparability_key != one.comparability_key
    d = decide({"mmlu": Score.of(two)}, {"mmlu": Score.of(one)}, "base model")
    assert d.table[0]["delta"] is None
    assert d.not_comparable == ["mmlu: not comparable (computed differently in reduced precision (torch_threads 1 vs 2))"]
    assert scored(bf16, batch_size=16).comparability_key != one.comparability_key
    # fp32: the same key whatever the threads and batch, and as before this change (no arrangement part)
    assert scored(fp32, threads=1).comparability_key == scored(fp32, threads=2, batch_size=16).comparability_key
    assert "arrangement" not in scored(fp32).comparability and scored(fp32).settings["torch_threads"] == 1

    # Split into runs: every 2nd item (item shards) or subjects apart (subject shards). Merged, an fp32
    # result keeps the whole run's key; a bf16 one does not.
    for dtype in (fp32, bf16):
        whole = scored(dtype, name="math", limit=None)
        items = merge_shards([scored(dtype, name="math", limit=None, part=(k, 2)) for k in range(2)])
        assert items.settings["split"] == "2 runs, item i in run i mod 2" and items.records == whole.records
        subjects = ["astronomy", "high_school_biology"]
        together = scored(dtype, subsets=subjects, limit=None)
        apart = merge_shards([scored(dtype, subsets=[s], limit=None) for s in subjects])
        assert apart.settings["split"] == [1, 1] and apart.records == together.records
        equal = dtype == fp32
        assert (items.comparability_key == whole.comparability_key) == equal
        assert (apart.comparability_key == together.comparability_key) == equal

    # Shards computed differently (a Ray cluster's machines: `auto` picks bf16 on one CPU, fp32 on
    # another; other thread counts): the merged score records each shard's way, and is keyed apart
    # from a run computed one way (it once took the first shard's settings for all).
    mixed = merge_shards([scored(dtype, name="math", limit=None, part=(k, 2)) for k, dtype in enumerate((bf16, fp32))])
    assert mixed.settings["dtype"] == ["bfloat16", "float32"] and mixed.comparability["precision"] == ["bfloat16", "float32"]
    assert mixed.comparability_key not in {merge_shards([scored(d, name="math", limit=None, part=(k, 2)) for k in range(2)])
                                           .comparability_key for d in (bf16, fp32)}
    threads = merge_shards([scored(bf16, threads=k + 1, subsets=[s], limit=None) for k, s in enumerate(subjects)])
    assert threads.settings["torch_threads"] == [1, 2] and threads.comparability["arrangement"]["torch_threads"] == [1, 2]
    assert threads.settings["kernels"] == kernels("cpu")  # the same in every shard: one value, as before

    bench = SimpleNamespace(name="arith", fingerprint="f" * 16, path="arith.yaml")
    records = [{"doc_id": 0, "correct": True}]
    keyed = {(dtype, threads): custom_provenance(bench, records, None, dtype, {"kernels": "cpu", "torch_threads": threads})
             for dtype in ("float32", "bfloat16") for threads in (1, 2)}
    assert keyed["float32", 1]["comparability_key"] == keyed["float32", 2]["comparability_key"]
    assert keyed["bfloat16", 1]["comparability_key"] != keyed["bfloat16", 2]["comparability_key"]


def test_the_scoring_passes_a_gpu_probe_picked_are_part_of_a_reduced_precision_key(monkeypatch):
    """Off the CPU a timing probe picks, per model, packed passes or HFLM's batches for MMLU
    (scoring_probe.py): base and tuned, or two nights, could score one way and the other under one
    key, though in bf16 the two round differently. In fp32 they agree item by item: one key."""
    from types import SimpleNamespace

    import torch

    from tasks.gate import Score, decide

    monkeypatch.setattr("tasks.device.kernels", lambda device: "NVIDIA H100 80GB HBM3")

    def scored(dtype, packs, device="cuda", name="mmlu"):
        lm = GoldOrWrong(right=True)
        lm.model = SimpleNamespace(dtype=dtype, device=torch.device(device))
        lm.scoring_choice = (packs, "cuda probe")
        return REGISTRY[name].evaluate_lm(lm, BenchmarkConfig(name=name, data="fixture", limit=1))

    bf16, fp32 = torch.bfloat16, torch.float32
    packed, batches = scored(bf16, True), scored(bf16, False)
    assert packed.comparability_key != batches.comparability_key
    assert (packed.settings["scoring"], batches.settings["scoring"]) == ("packed", "HFLM batches")
    d = decide({"mmlu": Score.of(batches)}, {"mmlu": Score.of(packed)}, "base model")
    assert d.not_comparable == ["mmlu: not comparable (computed differently in reduced precision "
                                "(scoring packed vs HFLM batches))"]
    assert scored(bf16, True).comparability_key == packed.comparability_key
    assert scored(fp32, True).comparability_key == scored(fp32, False).comparability_key
    # Not recorded where there is no choice: on a CPU, and for generated answers.
    assert "scoring" not in scored(bf16, True, device="cpu").settings
    assert "scoring" not in scored(bf16, False, name="gsm8k").settings


def test_trend_draws_one_series_per_comparability_key(tmp_path):
    from tasks.storage import ArtifactStore, write_manifest
    from tasks.trends import collect_scores, write_trend

    def run(run_id, n, key, score):
        r = ArtifactStore(str(tmp_path)).child("runs", run_id)
        r.write_json("benchmarks/comparison.json", [{"benchmark": "gsm8k", "n": n, "tuned": score, "base": 0.0}])
        r.write_json("benchmarks/gsm8k/tuned.summary.json", {"score": score, "n": n, "comparability_key": key})
        write_manifest(r.uri, {"run_id": run_id})
        return r.uri

    run("20260101-a", 2, "key2items", 1.0)
    run("20260102-b", 10, "key10items", 0.3)
    current = run("20260103-c", 10, "key10items", 0.4)
    rows = collect_scores(str(tmp_path))
    assert rows[0][1] == {"gsm8k [key2item]": 1.0} and rows[1][1] == {"gsm8k [key10ite]": 0.3}
    table, _ = write_trend(str(tmp_path), current)
    assert table.splitlines()[0] == "| run | gsm8k [key10ite] | gsm8k [key2item] |"
    assert "| 20260101-a |  | 1.0000 (n=2) |" in table and "| 20260102-b | 0.3000 (n=10) |  |" in table


def test_trend_series_are_named_by_what_sets_them_apart(tmp_path):
    """Two MMLU series were `mmlu [1ece8f6b]` and `mmlu [b5eee9ff]`: hashes a reader cannot place.
    Now the parts of the keys that differ, in words; a hashed part alone (other data) keeps the key."""
    from tasks.storage import ArtifactStore, write_manifest
    from tasks.trends import collect_scores

    same = {"benchmark": "gsm8k", "data": "d1", "n": 10, "num_fewshot": 5, "format": None, "precision": "float32"}
    for run_id, key, change in [("20260101-a", "k-a", {"n": 2}), ("20260102-b", "k-b", {}),
                                ("20260103-c", "k-c", {"num_fewshot": 0}), ("20260104-d", "k-d", {"data": "d2"}),
                                ("20260105-e", "k-b", {})]:
        r = ArtifactStore(str(tmp_path)).child("runs", run_id)
        parts = same | change
        r.write_json("benchmarks/comparison.json", [{"benchmark": "gsm8k", "n": parts["n"], "tuned": 0.5, "base": 0.0},
                                                    {"benchmark": "bbh", "n": 3, "tuned": 0.1, "base": 0.0}])
        r.write_json("benchmarks/gsm8k/tuned.summary.json", {"n": parts["n"], "comparability_key": key, "comparability": parts})
        r.write_json("benchmarks/bbh/tuned.summary.json", {"n": 3, "comparability_key": "bbh-key"})
        write_manifest(r.uri, {"run_id": run_id})
    rows = dict(collect_scores(str(tmp_path)))
    assert [set(scores) - {"bbh"} for scores in rows.values()] == [
        {"gsm8k [n=2, 5-shot]"}, {"gsm8k [n=10, 5-shot, k-b]"}, {"gsm8k [n=10, 0-shot]"}, {"gsm8k [n=10, 5-shot, k-d]"},
        {"gsm8k [n=10, 5-shot, k-b]"}], rows
    assert all("bbh" in scores for scores in rows.values())  # one key: its plain name


def test_published_profile_expands_to_the_model_cards_settings(tmp_path, monkeypatch):
    from tasks.checks import ConfigError, check_benchmark_data

    cfg = RunConfig(benchmarks="published")
    assert [(b.name, b.num_fewshot, b.limit, b.data) for b in cfg.benchmarks] == [
        ("mmlu", 0, None, "hub"), ("bbh", 3, None, "hub"), ("gsm8k", 5, None, "hub")]
    assert cfg.benchmarks[0].format == "cloze" and cfg.benchmarks[1].variant == "answer_only"
    assert [b.batch_size for b in cfg.benchmarks] == [8, 32, 32]  # generation at 32 rows
    local = RunConfig(benchmarks=f"published:{tmp_path}")
    assert local.benchmarks[2].data == str(tmp_path / "gsm8k")
    with pytest.raises(ValidationError, match="unknown profile 'leaderboard'"):
        RunConfig(benchmarks="leaderboard")
    with pytest.raises(ConfigError, match=r"benchmarks\[0\] \(mmlu\).*needs the Hugging Face hub, but HF_HUB_OFFLINE=1"):
        check_benchmark_data(cfg)


def test_a_passed_benchmark_data_check_is_repeated_only_when_something_changed(tmp_path, monkeypatch):
    """A cached re-run skips the check it passed (it loads lm-eval's task loader and datasets, ~1 s);
    other settings or changed files are checked afresh, and what is wrong then is named."""
    import shutil

    from tasks.benchmarks.base import LmEvalBenchmark
    from tasks.checks import ConfigError, check_benchmark_data
    from tasks.runtime import FIXTURES

    shutil.copytree(FIXTURES / "gsm8k", tmp_path / "gsm8k")

    def config(shots: int) -> RunConfig:
        return RunConfig(benchmarks=[{"name": "gsm8k", "data": str(tmp_path / "gsm8k"), "num_fewshot": shots}])

    checked = []
    real = LmEvalBenchmark.check
    monkeypatch.setattr(LmEvalBenchmark, "check", lambda self, cfg: checked.append(cfg.num_fewshot) or real(self, cfg))
    check_benchmark_data(config(2))
    check_benchmark_data(config(2))
    assert checked == [2]
    check_benchmark_data(config(3))
    assert checked == [2, 3]
    with (tmp_path / "gsm8k" / "test.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(ConfigError, match=r"benchmarks\[0\] \(gsm8k\): .*test\.jsonl:\d+"):
        check_benchmark_data(config(2))
    assert checked == [2, 3, 2]


def test_local_benchmark_files_leave_no_arrow_copies_in_datasets_cache(tmp_path):
    """datasets keeps an Arrow copy per file path and modification time, forever: MMLU's per-subject
    files are written anew for every evaluation, so each one left a copy a subject (57 a night)."""
    from datasets import config as datasets_config

    from tasks.benchmarks.base import FIXTURES

    cache = datasets_config.HF_DATASETS_CACHE

    def entries():
        return set(cache.iterdir()) | set((cache / "json").glob("*")) if cache.exists() else set()

    before = entries()
    mmlu = BenchmarkConfig(name="mmlu", subsets=["abstract_algebra"], data=str(_mmlu_dir(tmp_path)), limit=2)
    gsm8k = BenchmarkConfig(name="gsm8k", data=str(FIXTURES / "gsm8k"), limit=2)
    for _ in range(2):
        assert REGISTRY["mmlu"].evaluate_lm(GoldOrWrong(right=True), mmlu).score == 1.0
        assert REGISTRY["gsm8k"].evaluate_lm(GoldOrWrong(right=True), gsm8k).score == 1.0
    assert entries() == before
