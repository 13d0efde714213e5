"""Custom benchmarks: every scorer, every broken definition (named by file and line), gold answers
scoring 100% and wrong ones 0%, and a real cached run on a tiny model through Prefect."""

import json
import re
import shutil
from pathlib import Path

import pytest

from tasks.benchmarks import scorers
from tasks.benchmarks.custom import (
    CustomBenchmarkError,
    evaluate_custom,
    load_definition,
    load_definitions,
    run_custom_benchmark,
    score_outputs,
)
from tasks.runtime import FIXTURES

CUSTOM = FIXTURES / "custom"


class RuleJudge:
    """A judge backend with the tasks.judge interface that passes an answer when it contains the
    reference answer, says nothing parseable when asked about "mumble", and fails the rest."""

    identity = "rule-judge"

    def __init__(self):
        self.seen = []

    def chat(self, conversations, max_new_tokens):
        self.seen += conversations
        replies = []
        for (message,) in conversations:
            text = message["content"]
            gold = text.split("Reference answer:\n")[1].split("\n")[0]
            answer = text.split("Answer to grade:\n")[1].split("\n\nDoes the answer")[0]
            replies.append("hmm" if "mumble" in answer else "PASS" if gold.lower() in answer.lower() else "FAIL.")
        return replies


# --- scorers -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "scorer, output, gold, args, expected",
    [
        ("exact_match", " Paris\n", "Paris", {}, True),
        ("exact_match", "paris", "Paris", {}, False),
        ("normalized_match", "The Paris!", "paris", {}, True),
        ("normalized_match", "Paris, France", "Paris", {}, False),
        ("contains", "I think it is PARIS, surely.", "Paris", {}, True),
        ("contains", "I think it is PARIS.", "Paris", {"case_sensitive": True}, False),
        ("contains", "Lyon", "Paris", {}, False),
        ("regex", "Answer: red. Final answer: Blue!", "blue", {"pattern": r"answer:\s*(\w+)"}, True),  # the last match
        ("regex", "Answer: blue. Final answer: red", "blue", {"pattern": r"answer:\s*(\w+)"}, False),
        ("regex", "blue, no marker here", "blue", {"pattern": r"answer:\s*(\w+)"}, False),
        ("regex", "x=7", "7", {"pattern": r"x=(?P<v>\d+)", "group": "v"}, True),
        ("numeric", "That makes 1,234.5 in total", 1234.5, {}, True),
        ("numeric", "First 3, then 10", "10", {}, True),
        ("numeric", "about 3.14", 3.14159, {"tolerance": 0.01}, True),
        ("numeric", "about 3.2", 3.14159, {"tolerance": 0.01}, False),
        ("numeric", "99", 100, {"tolerance": 0.02, "relative": True}, True),
        ("numeric", "97", 100, {"tolerance": 0.02, "relative": True}, False),
        ("numeric", "no number", 5, {}, False),
        ("math_verify", "So the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", {}, True),
        ("math_verify", "The answer is $\\boxed{3}$", "$\\frac{6}{2}$", {}, True),
        ("math_verify", "The answer is $\\boxed{4}$", "3", {}, False),
    ],
)
def test_scorer(scorer, output, gold, args, expected):
    args = scorers.ARGS[scorer].model_validate(args).model_dump()
    assert scorers.SCORERS[scorer](output, gold, **args) is expected


def test_judge_rubric_scorer_parses_pass_fail_and_counts_unparseable():
    judge = RuleJudge()
    rubric = "The answer names the right city."
    assert scorers.judge_rubric("It is Paris.", "Paris", rubric=rubric, judge=judge, question="Capital of France?")
    assert not scorers.judge_rubric("It is Lyon.", "Paris", rubric=rubric, judge=judge)
    asked = judge.seen[0][0]["content"]
    assert "Capital of France?" in asked and rubric in asked and asked.endswith("PASS or FAIL.")
    assert [scorers.parse_verdict(r) for r in ("PASS", "Verdict: fail.", "FAIL, it does not PASS", "maybe", "")] == [
        True, False, False, None, None]
    verdicts = scorers.judge_verdicts(judge, ["q"] * 3, ["Paris", "Lyon", "mumble"], ["Paris"] * 3, rubric)
    assert [v for _, v in verdicts] == [True, False, None]
    with pytest.raises(ValueError, match="needs a judge backend"):
        scorers.judge_rubric("x", "y", rubric=rubric)


# --- broken definitions ------------------------------------------------------------------------

GOOD = """\
name: capitals
data: items.jsonl
prompt_field: prompt
answer_field: answer
scorer: normalized_match
scorer_args: {}
max_new_tokens: 16
"""
ITEMS = '{"prompt": "Capital of France?", "answer": "Paris"}\n{"prompt": "Capital of Japan?", "answer": "Tokyo"}\n'


def _scorer(name: str, args: str | None = None) -> str:
    """GOOD with another scorer and, if given, its scorer_args (YAML lines under the key)."""
    definition = GOOD.replace("normalized_match", name)
    return definition.replace("scorer_args: {}", f"scorer_args:\n  {args}") if args else definition


def _write(folder: Path, definition: str = GOOD, items: str | None = ITEMS, name: str = "bench.yaml") -> Path:
    (folder / name).write_text(definition)
    if items is not None:
        (folder / "items.jsonl").write_text(items)
    return folder / name


@pytest.mark.parametrize(
    "definition, items, where, message",
    [
        (GOOD.replace("scorer: normalized_match\n", ""), ITEMS, "bench.yaml:",
         r"missing required key `scorer`: add `scorer: one of exact_match \| normalized_match"),
        (GOOD.replace("normalized_match", "normalised_match"), ITEMS, "bench.yaml:5:",
         "unknown scorer 'normalised_match'; did you mean `normalized_match`?"),
        (_scorer("regex", "pattern: 'answer: (\\w+'"), ITEMS, "bench.yaml:7:",
         r"scorer_args.pattern: bad regex 'answer: \(\\\\w\+': missing \), unterminated subpattern"),
        (_scorer("regex", "pattern: 'answer: \\w+'"), ITEMS, "bench.yaml:6:",
         "has only 0 group.*add a \\(...\\) group around the answer or set group: 0"),
        (GOOD, "", "items.jsonl",
         r"no items \(the file is empty or blank\); add one JSON object per line \(data: in .*bench.yaml:2\)"),
        (GOOD.replace("items.jsonl", "missing.jsonl"), ITEMS, "bench.yaml:2:",
         "data file 'missing.jsonl' not found .*relative to the definition file"),
        (GOOD, ITEMS + '{"prompt": "Capital of Peru?", "gold": "Lima"}\n', "items.jsonl:3:",
         r"no `answer` \(answer_field\); keys present: \['gold', 'prompt'\]; add it or set answer_field"),
        (GOOD, ITEMS + '{"prompt": "Capital of Peru?" "answer": "Lima"}\n', "items.jsonl:3:",
         "not valid JSON .*each line must be one complete JSON object"),
        (GOOD, ITEMS + '{"prompt": "Capital of Peru?", "answer": "Quito", "answer": "Lima"}\n', "items.jsonl:3:",
         r"key 'answer' twice in one object \(JSON readers keep only the last value; write each key once\)"),
        (GOOD.replace("max_new_tokens", "max_new_token"), ITEMS, "bench.yaml:7:",
         "unknown key `max_new_token`: did you mean `max_new_tokens`?"),
        # beyond the required cases: wrong types, key rules, duplicate keys, unmatchable golds
        (GOOD.replace("16", "'16'"), ITEMS, "bench.yaml:7:",
         "max_new_tokens: input should be a valid integer, got '16'"),
        (GOOD + "messages_field: messages\n", ITEMS, "bench.yaml:8:", "set prompt_field or messages_field, not both"),
        (GOOD + "scorer: exact_match\n", ITEMS, "bench.yaml:8:", "key 'scorer' appears twice \\(first on line 5\\)"),
        (_scorer("numeric"), ITEMS, "items.jsonl:1:", "holds no number, which the numeric scorer needs"),
        (_scorer("judge_rubric"), ITEMS, "bench.yaml:6:", "missing required key `scorer_args.rubric`"),
        (GOOD, '{"prompt": "", "answer": "x"}\n', "items.jsonl:1:", "`prompt` must be non-empty text"),
        (GOOD.replace("scorer_args: {}", "scorer_args: {"), ITEMS, "bench.yaml:", "not valid YAML"),
        # an empty gold answer: `contains` would pass every output, exact matches only an empty one
        (_scorer("contains"), ITEMS + '{"prompt": "Capital of Peru?", "answer": ["Lima", " "]}\n', "items.jsonl:3:",
         "answer ' ' is empty: every output contains it"),
        # the same prompt twice (a file appended to itself): scored twice, n doubled and the stderr shrunk
        (GOOD, ITEMS + ITEMS, "items.jsonl:3:",
         r"the same prompt as line 1 \(it would be scored, and counted, twice\)"),
        (GOOD.replace("prompt_field: prompt", "messages_field: messages"),
         '{"messages": [{"role": "user", "content": "Hi?"}], "answer": "x"}\n'
         '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], '
         '"answer": "x"}\n'
         '{"messages": [{"role": "user", "content": "Hi?"}], "answer": "y"}\n', "items.jsonl:3:",
         "the same prompt as line 1 .*give that line a list of acceptable answers"),
    ],
)
def test_broken_definition_is_rejected_with_file_line_and_fix(tmp_path, definition, items, where, message):
    path = _write(tmp_path, definition, items)
    with pytest.raises(CustomBenchmarkError) as err:
        load_definition(path)
    text = str(err.value)
    assert str(tmp_path / where) in text, text
    assert re.search(message, text), text


def test_items_split_on_newlines_only_and_bytes_that_are_not_utf8_are_named(tmp_path):
    # U+2028 inside a JSON string is text, not a line break (str.splitlines would break it there).
    items = '{"prompt": "Two\u2028lines?", "answer": "Yes"}\n{"prompt": "Capital of Japan?", "answer": "Tokyo"}\n'
    loaded = load_definition(_write(tmp_path, items=items))
    assert [(i.line, i.prompt) for i in loaded.items] == [(1, "Two\u2028lines?"), (2, "Capital of Japan?")]
    (tmp_path / "items.jsonl").write_bytes(ITEMS.encode() + '{"prompt": "Caf\u00e9?", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(CustomBenchmarkError, match=r"items.jsonl:3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        load_definition(tmp_path / "bench.yaml")
    (tmp_path / "bench.yaml").write_bytes(GOOD.replace("capitals", "capit\u00e4ls").encode("latin-1"))
    with pytest.raises(CustomBenchmarkError, match=r"bench.yaml:1: not UTF-8 text \(byte 0xe4\)"):
        load_definition(tmp_path / "bench.yaml")


def test_json_definition_errors_name_their_line_and_bad_messages(tmp_path):
    spec = json.loads((CUSTOM / "arithmetic.json").read_text()) | {"data": "items.jsonl", "scorer_arg": {}}
    item = {"messages": [{"role": "user", "content": "1+1?"}], "answer": 2}
    path = _write(tmp_path, json.dumps(spec, indent=2), json.dumps(item) + "\n", name="bench.json")
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if '"scorer_arg"' in t)
    with pytest.raises(CustomBenchmarkError, match=rf"bench.json:{line}: unknown key `scorer_arg`: did you mean"):
        load_definition(path)
    del spec["scorer_arg"]
    item["messages"][0]["role"] = "assistant"
    _write(tmp_path, json.dumps(spec), json.dumps(item) + "\n", name="bench.json")
    with pytest.raises(CustomBenchmarkError, match="items.jsonl:1: `messages` must end with a user message"):
        load_definition(path)
    (tmp_path / "bench.json").write_text('{"name": "x",\n "data": }')
    with pytest.raises(CustomBenchmarkError, match="bench.json:2: not valid JSON"):
        load_definition(path)


def test_duplicate_names_across_definitions(tmp_path):
    a = _write(tmp_path, name="a.yaml")
    b = _write(tmp_path, name="b.yaml")
    with pytest.raises(CustomBenchmarkError, match="name 'capitals' is already used by .*a.yaml; rename one"):
        load_definitions([str(a), str(b)])


# --- scoring -----------------------------------------------------------------------------------

@pytest.mark.parametrize("file", ["capitals.yaml", "arithmetic.json"])
def test_shipped_definitions_score_gold_100_and_wrong_0(file):
    bench = load_definition(CUSTOM / file)
    assert len(bench.items) == 8 and len(bench.fingerprint) == 64
    right, metrics = score_outputs(bench, [str(item.golds[-1]) for item in bench.items])
    assert metrics[bench.scorer] == 1.0 and all(r["correct"] for r in right)
    wrong, metrics = score_outputs(bench, ["I do not know, maybe 123456."] * len(bench.items))
    assert metrics[bench.scorer] == 0.0 and not any(r["correct"] for r in wrong)
    assert set(right[0]) >= {"prompt", "output", "extracted", "gold", "correct"}
    assert right[0]["doc_id"] == 1  # the item's line in the JSONL file


def test_judge_rubric_scoring_records_replies_and_counts_unparseable(tmp_path):
    definition = _scorer("judge_rubric", "rubric: Names the right city.")
    bench = load_definition(_write(tmp_path, definition, ITEMS + '{"prompt": "Capital of Peru?", "answer": "Lima"}\n'))
    records, metrics = score_outputs(bench, ["Paris", "Kyoto", "mumble"], judge=RuleJudge())
    assert [r["verdict"] for r in records] == ["PASS", "FAIL", None]
    assert [r["correct"] for r in records] == [True, False, False]
    assert metrics == {"unparseable": 1.0, "judge_rubric": 1 / 3}
    with pytest.raises(CustomBenchmarkError, match="needs a judge"):
        score_outputs(bench, ["Paris", "Kyoto", "Lima"])


def test_limit_system_prompt_and_fingerprint(tmp_path):
    path = _write(tmp_path, GOOD + "limit: 1\nsystem_prompt: Be brief.\n")
    bench = load_definition(path)
    assert [i.prompt for i in bench.selected()] == ["Capital of France?"]
    assert bench.conversation(bench.items[0]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    again = load_definition(path)
    assert again.fingerprint == bench.fingerprint
    # What changes no answer and no score leaves it (and so the score's comparability key): a
    # description, a comment, a reformatted item line. Any edit of the file's bytes changed it.
    path.write_text(path.read_text() + "description: capitals, edited\n# a comment\n")
    (tmp_path / "items.jsonl").write_text(ITEMS.replace('", "', '",  "'))
    assert (tmp_path / "items.jsonl").read_text() != ITEMS and load_definition(path).fingerprint == bench.fingerprint
    path.write_text(path.read_text().replace("max_new_tokens: 16", "max_new_tokens: 8"))
    assert load_definition(path).fingerprint != bench.fingerprint  # a setting that moves answers
    path.write_text(path.read_text().replace("max_new_tokens: 8", "max_new_tokens: 16"))
    (tmp_path / "items.jsonl").write_text(ITEMS.replace("Tokyo", "Kyoto"))
    assert load_definition(path).fingerprint != bench.fingerprint


def test_generation_with_raw_prompts_and_stop_strings(tiny_base_model_dir, tmp_path):
    from tasks.generation import generate
    from tasks.models import load_model, resolve_model

    model, tokenizer = load_model(resolve_model.fn(str(tiny_base_model_dir)))
    full = generate(model, tokenizer, ["The capital of France is"], 12, chat_template=False)[0]
    assert full.completion and full.new_tokens == 12
    stop = full.completion[-2:]  # a string the greedy output is sure to contain
    cut = generate(model, tokenizer, ["The capital of France is"], 12, chat_template=False, stop=[stop])[0]
    assert stop not in cut.completion and full.completion.startswith(cut.completion)
    assert cut.new_tokens < 12  # generation halted at the stop string, not just trimmed afterwards
    # a definition asking for the chat template on a model without one fails, saying what to set
    bench = load_definition(_write(tmp_path))
    with pytest.raises(CustomBenchmarkError, match="no chat template; set chat_template: false"):
        evaluate_custom(model, tokenizer, bench)
    raw = evaluate_custom(model, tokenizer, load_definition(_write(tmp_path, GOOD + "chat_template: false\n")))
    assert raw.n == 2 and raw.settings["chat_template"] is False


def test_the_engine_recorded_is_the_one_that_generated_and_is_in_the_key(tiny_base_model_dir, tmp_path, monkeypatch):
    """Custom benchmarks generate on smolflow-hf's engine (tasks/generation.py) since 2026-12-03, yet
    their settings said transformers' generate, and the key left the engine out: scores of the two
    engines (which stopped differently) shared one key."""
    from tasks.benchmarks.fast_lm import ENGINE as FAST_LM, SharedPrefixLM
    from tasks.models import load_model, resolve_model

    used = []
    greedy = SharedPrefixLM.greedy
    monkeypatch.setattr(SharedPrefixLM, "greedy", lambda self, *a, **k: used.append(FAST_LM) or greedy(self, *a, **k))
    model, tokenizer = load_model(resolve_model.fn(str(tiny_base_model_dir)))
    result = evaluate_custom(model, tokenizer, load_definition(_write(tmp_path, GOOD + "chat_template: false\n")))
    assert used and result.settings["engine"].startswith(f"{FAST_LM} greedy") and "transformers" not in result.settings["engine"]
    assert result.comparability["engine"] == result.settings["engine"]


def test_a_model_without_a_chat_template_is_refused_before_any_model_runs(tiny_base_model_dir, tiny_model_dir,
                                                                          tmp_path):
    """A base model as the judge (run, arena), as the evaluated model (eval: the judge's answers, chat
    custom benchmarks) or as an arena contestant failed at its first generation: after training or the
    other benchmarks, in transformers' words naming no setting. The checks before the flow say it."""
    from tasks.checks_eval import check_eval_template
    from tasks.arena_config import ArenaConfig
    from tasks.arena_tasks import check_arena_inputs
    from tasks.checks import check_judge_model
    from tasks.config import RunConfig

    base, chat = str(tiny_base_model_dir), str(tiny_model_dir)
    with pytest.raises(ValueError, match=r"judge.model=.* has no chat template, so it cannot read a judging prompt"):
        check_judge_model(RunConfig(judge={"model": base}))
    check_judge_model(RunConfig(judge={"model": chat}))
    bench = load_definition(_write(tmp_path))  # chat_template: true
    with pytest.raises(ValueError, match=r"model=.* has no chat template, so it cannot answer the judge's instructions "
                                         r"\(judge.enabled: true\) or custom benchmark 'capitals'"):
        check_eval_template(RunConfig(model=base), [bench])
    with pytest.raises(ValueError, match="set chat_template: false in that definition$"):
        check_eval_template(RunConfig(model=base, judge={"enabled": False}), [bench])
    check_eval_template(RunConfig(model=base, judge={"enabled": False}), [])  # raw prompts only (lm-eval): fine
    check_eval_template(RunConfig(model=chat), [bench])
    with pytest.raises(ValueError, match=r"models\[1\]=.* has no chat template, so it cannot answer the arena's "
                                         r"prompts"):
        check_arena_inputs(ArenaConfig(models=[chat, base]))
    with pytest.raises(ValueError, match=r"judge.model=.* has no chat template"):
        check_arena_inputs(ArenaConfig(judge={"model": base}))
    check_arena_inputs(ArenaConfig(models=[chat], judge={"model": chat}))


def test_run_custom_benchmark_is_cached_until_an_item_changes(tiny_ref, tmp_path):
    for f in ("arithmetic.json", "arithmetic.jsonl"):
        shutil.copy(CUSTOM / f, tmp_path / f)
    bench = load_definition(tmp_path / "arithmetic.json")
    first = run_custom_benchmark(tiny_ref, bench, return_state=True)
    assert first.name == "Completed", first
    result = first.result()
    assert result.name == "custom/arithmetic" and result.n == len(result.records) == 8
    assert result.metric == "numeric" and 0.0 <= result.score <= 1.0
    assert result.settings["fingerprint"] == bench.fingerprint
    assert result.settings["data_path"] == str(tmp_path / "arithmetic.jsonl")
    assert result.settings["scorer_args"] == {"tolerance": 0.01, "relative": False}
    assert result.settings["messages_field"] == "messages" and result.settings["stop"] == ["\n\n"]
    assert all(isinstance(r["prompt"], list) and isinstance(r["correct"], bool) for r in result.records)

    again = run_custom_benchmark(tiny_ref, load_definition(tmp_path / "arithmetic.json"), return_state=True)
    assert again.name == "Cached"
    items = tmp_path / "arithmetic.jsonl"
    items.write_text(items.read_text().replace('"answer": 43', '"answer": 44'))
    edited = run_custom_benchmark(tiny_ref, load_definition(tmp_path / "arithmetic.json"), return_state=True)
    assert edited.name == "Completed"
    assert edited.result().settings["fingerprint"] != bench.fingerprint


def test_judge_rubric_through_the_real_local_judge(tiny_model_dir, tmp_path):
    from tasks.config import JudgeConfig
    from tasks.models import load_model, resolve_model

    definition = _scorer("judge_rubric", "rubric: Names the right city.\n  max_new_tokens: 4")
    bench = load_definition(_write(tmp_path, definition))
    model, tokenizer = load_model(resolve_model.fn(str(tiny_model_dir)))
    result = evaluate_custom(model, tokenizer, bench, JudgeConfig(backend="local", model=str(tiny_model_dir)))
    # A random-weight judge writes no PASS/FAIL: every item fails and is counted as unparseable.
    assert result.n == 2 and result.settings["judge"]
    assert all(isinstance(r["judge_reply"], str) for r in result.records)
    unparseable = sum(r["verdict"] is None for r in result.records)
    assert result.metrics["unparseable"] == unparseable
    assert result.score == sum(r["verdict"] == "PASS" for r in result.records) / 2
