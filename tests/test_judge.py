"""LLM-as-judge: AlpacaEval's win-rate arithmetic, both orders per pair, ties and parse failures,
cached verdicts, the local judge end to end, and the OpenAI-compatible path against a real
`transformers serve` on this machine."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.config import JudgeConfig
from tasks.judge import (
    FIXTURE_INSTRUCTIONS,
    FIXTURE_REFERENCES,
    judge,
    judge_inputs,
    judge_pairs,
    parse_verdict,
    preference,
    run_judge,
    win_rate,
    write_judge,
)
from tasks.judge_backends import PLACEHOLDER_KEY, JudgeBackend, LocalBackend, api_key, make_backend
from tasks.models import BUILTIN
from tasks.storage import ArtifactStore

FIXTURE_ROWS = [json.loads(line) for line in FIXTURE_REFERENCES.read_text().splitlines()]


@pytest.fixture
def judgement_cache(tmp_path, monkeypatch):
    """A fresh verdict cache, so a test sees its own judge calls only."""
    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    # The built-in model's conversion stays shared, as conftest arranges for the whole session.
    (tmp_path / "cache" / "models").symlink_to(Path.home() / ".cache" / "smolflow" / "models")
    return tmp_path / "cache" / "judgements"


# --- arithmetic: AlpacaEval's get_winrate, checked by hand ------------------------------------

@pytest.mark.parametrize(
    ("preferences", "expected"),
    [
        # 3 wins, 1 tie, 1 loss: (3 + 0.5) / 5 = 70 %; scores 1,1,1,.5,0 have sd .447, / sqrt(5) = 20 %.
        ([2, 2, 2, 1.5, 1], {"win_rate": 70.0, "stderr": 20.0, "n": 5, "wins": 3, "ties": 1, "losses": 1}),
        ([1.5, 1.5, 1.5, 1.5], {"win_rate": 50.0, "stderr": 0.0, "n": 4, "wins": 0, "ties": 4, "losses": 0}),
        # 1 win of 3: 33.3 %; scores 0,0,1 have variance 1/3, so stderr = sqrt(1/3 / 3) = 1/3.
        ([1, 1, 2], {"win_rate": 100 / 3, "stderr": 100 / 3, "n": 3, "wins": 1, "ties": 0, "losses": 2}),
        ([2], {"win_rate": 100.0, "stderr": None, "n": 1, "wins": 1, "ties": 0, "losses": 0}),
        ([], {"win_rate": None, "stderr": None, "n": 0, "wins": 0, "ties": 0, "losses": 0}),
    ],
)
def test_win_rate_is_alpaca_evals_arithmetic(preferences, expected):
    got = win_rate(preferences)
    assert got == pytest.approx(expected)


def test_two_orders_combine_into_one_preference():
    # (verdict with tuned as (a), verdict with tuned as (b)) -> AlpacaEval preference
    assert preference("a", "b") == 2.0  # tuned picked in both positions
    assert preference("b", "a") == 1.0  # reference picked in both positions
    assert preference("a", "a") == 1.5  # always position (a): the bias cancels into a tie
    assert preference("b", "b") == 1.5
    assert preference(None, "b") is None and preference("a", None) is None  # left out, not a loss


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("Output (a)", "a"), ("Output (b)", "b"), ("output(b).", "b"), ("**Output (a)**", "a"), ("b", "b"),
        ("(A)", "a"), ("Answer: b", "b"), ("Output b", "b"), ("Output (b) is better than Output (a).", "b"),
        ("I prefer output (a) because it is clearer.", "a"), ("Output (a)\n\nOutput (b)", "a"),
        ("", None), ("A good answer should be concise.", None), ("Both are fine.", None), ("tie", None),
        ("Output (c)", None),
    ],
)
def test_verdicts_parse_or_fail_visibly(raw, parsed):
    assert parse_verdict(raw) == parsed


# --- combination logic, with deterministic judges (only these tests fake the judge) -----------

class AlwaysA(JudgeBackend):
    """A maximally position-biased judge."""

    identity = "test:always-a"

    def __init__(self):
        self.seen: list[list[dict]] = []

    def chat(self, conversations, max_new_tokens):
        self.seen += conversations
        return ["Output (a)"] * len(conversations)


class PrefersStar(JudgeBackend):
    """Picks whichever output holds a star; cannot decide when the instruction says UNSURE."""

    identity = "test:prefers-star"

    def chat(self, conversations, max_new_tokens):
        answers = []
        for messages in conversations:
            user = messages[-1]["content"].rsplit("## Instruction:", 1)[1]
            a = user.split("## Output (a):", 1)[1].split("## Output (b):", 1)[0]
            answers.append("I cannot tell." if "UNSURE" in user else "Output (a)" if "★" in a else "Output (b)")
        return answers


def test_position_bias_cancels_both_orders_judged(judgement_cache):
    backend = AlwaysA()
    result = judge(backend, ["Q1", "Q2", "Q3"], ["tuned 1", "tuned 2", "tuned 3"], ["ref 1", "ref 2", "ref 3"])
    assert (result.win_rate, result.ties, result.n, result.parse_failures) == (50.0, 3, 3, 0)
    assert len(backend.seen) == 6
    # Each pair was shown both ways round: tuned as (a), then as (b).
    first, second = backend.seen[0][-1]["content"], backend.seen[1][-1]["content"]
    assert first.index("tuned 1") < first.index("ref 1") and second.index("ref 1") < second.index("tuned 1")
    assert backend.seen[0][0]["role"] == "system"  # AlpacaEval's ChatML template, split into messages


def test_content_judge_wins_losses_and_parse_failures(judgement_cache):
    result = judge(
        PrefersStar(),
        ["Q1", "Q2", "Q3", "Q4", "UNSURE Q5"],
        ["★ tuned", "★ tuned", "★ tuned", "tuned", "★ tuned"],
        ["ref", "ref", "ref", "★ ref", "ref"],
    )
    assert [r["preference"] for r in result.records] == [2.0, 2.0, 2.0, 1.0, None]
    # The UNSURE pair failed to parse in both orders: counted, reported, and out of the rate.
    assert (result.pairs, result.n, result.parse_failures) == (5, 4, 2)
    assert (result.wins, result.ties, result.losses) == (3, 0, 1)
    assert result.win_rate == pytest.approx(75.0)
    assert result.records[4]["verdict_tuned_as_a"] == "I cannot tell."
    assert result.lc_win_rate is None and "hub file" in result.settings["lc_win_rate"]


def test_mismatched_lengths_are_refused(judgement_cache):
    with pytest.raises(ValueError, match="one output and one reference per instruction"):
        judge(AlwaysA(), ["Q1", "Q2"], ["only one"], ["r1", "r2"])


# --- the real local judge: caching and end to end ---------------------------------------------

class Counting(JudgeBackend):
    """Counts the conversations a real backend is asked to judge."""

    def __init__(self, inner: JudgeBackend):
        self.inner, self.identity, self.calls = inner, inner.identity, 0

    def chat(self, conversations, max_new_tokens):
        self.calls += len(conversations)
        return self.inner.chat(conversations, max_new_tokens)


def test_verdicts_are_cached_by_content(tiny_model_dir, judgement_cache):
    backend = Counting(make_backend(JudgeConfig(model=str(tiny_model_dir))))
    assert isinstance(backend.inner, LocalBackend)
    instructions, references = ["Hello?", "Tips for a rainy day?"], ["Hi there!", "Read a book."]
    first = judge(backend, instructions, ["Hey.", "Stay in."], references)
    assert backend.calls == 4 and len(list(judgement_cache.glob("*.json"))) == 4
    again = judge(backend, instructions, ["Hey.", "Stay in."], references)
    assert backend.calls == 4, "a re-run must not re-judge"
    assert again.records == first.records
    # A changed answer re-judges exactly its pair, in both orders.
    judge(backend, instructions, ["Hey.", "Go outside anyway."], references)
    assert backend.calls == 6


def test_a_judge_computing_in_bf16_is_another_judge(tiny_model_dir, judgement_cache, monkeypatch):
    """bf16's rounding moves a judge's verdicts: fp32 ones (cached) never answer for it, and its
    identity, which the report and the win rate's settings show, says how it computed."""
    from tasks.config import ExecutionConfig
    from tasks.device import ENV
    from tasks.judge_backends import judge_identity

    cfg = JudgeConfig(model=str(tiny_model_dir))
    fp32 = Counting(make_backend(cfg))
    judge(fp32, ["Hello?"], ["Hey."], ["Hi there!"])
    monkeypatch.setenv(ENV, ExecutionConfig(device="cpu", precision="bf16").model_dump_json())
    bf16 = Counting(make_backend(cfg))
    assert bf16.identity == judge_identity(cfg) != fp32.identity and bf16.identity.startswith(fp32.identity + " (cpu, bf16, ")
    result = judge(bf16, ["Hello?"], ["Hey."], ["Hi there!"])
    assert bf16.calls == 2 and result.settings["judge_identity"] == bf16.identity
    assert len(list(judgement_cache.glob("*.json"))) == 4


def test_run_judge_end_to_end_with_the_local_model(tiny_ref, tiny_model_dir, judgement_cache, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg = JudgeConfig(model=str(tiny_model_dir), instructions="fixture", limit=2, max_new_tokens=6)
    result = run_judge(tiny_ref, tiny_ref, cfg, sample_prompts=["unused"], sample_max_new_tokens=99)
    assert result.settings["max_new_tokens"] == 6  # its own, set: not the samples' length
    assert [r["instruction"] for r in result.records] == [r["instruction"] for r in FIXTURE_ROWS[:2]]
    assert result.n + sum(r["preference"] is None for r in result.records) == result.pairs
    assert result.wins + result.ties + result.losses == result.n
    assert result.parse_failures == sum(
        (r["parsed_tuned_as_a"] is None) + (r["parsed_tuned_as_b"] is None) for r in result.records)
    # Reference 'base' with the same model as tuned: both sides are the same greedy answer.
    assert all(r["output"] == r["reference_output"] for r in result.records)
    assert result.settings["judge_identity"] == f"local:{tiny_ref.fingerprint}"

    run = ArtifactStore(str(tmp_path / "run"))
    write_judge(run, result)
    pairs = [json.loads(line) for line in (tmp_path / "run/judge/pairs.jsonl").read_text().splitlines()]
    assert pairs == result.records
    summary = run.read_json("judge/summary.json")
    assert summary["n"] == result.n and "records" not in summary and summary["lc_win_rate"] is None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["smolflow-judge"])))
    # Flow runs (here or in other test workers sharing the server) make this key too: the newest made outside one.
    newest = max((a for a in found if a.flow_run_id is None), key=lambda a: a.created)
    table = json.loads(newest.data)
    assert len(table) == 2 and table[0]["instruction"] == FIXTURE_ROWS[0]["instruction"]


def test_the_reference_model_and_the_limit_are_recorded(tiny_ref, tiny_model_dir, judgement_cache, tmp_path):
    """Reference 'base' is the run's base model in a fine-tune and the default model in smolflow eval;
    the settings said only 'base' (and not the limit), so two win rates "against base" read alike
    whichever model answered, on however many instructions."""
    cfg = JudgeConfig(model=str(tiny_model_dir), instructions="fixture", limit=1, max_new_tokens=4)
    result = run_judge(tiny_ref, tiny_ref, cfg, sample_prompts=["unused"], sample_max_new_tokens=4)
    assert result.settings["reference_model"] == {"source": tiny_ref.source, "path": tiny_ref.path,
                                                  "fingerprint": tiny_ref.fingerprint}
    assert result.settings["limit"] == 1
    run = ArtifactStore(str(tmp_path / "run"))
    write_judge(run, result)
    assert run.read_json("judge/summary.json")["settings"]["reference_model"]["fingerprint"] == tiny_ref.fingerprint
    assert f"against 'base' (the answers of {tiny_ref.source!r}, fingerprint {tiny_ref.fingerprint[:12]})" in \
        run.read_text("report/sections/judge.md")
    # A file of reference outputs: no model answered.
    from_file = run_judge(tiny_ref, tiny_ref, cfg.model_copy(update={"instructions": "samples", "reference": str(FIXTURE_REFERENCES)}),
                          [FIXTURE_ROWS[0]["instruction"]], 4)
    assert from_file.settings["reference_model"] is None and from_file.settings["limit"] == 1
    # A base model asked for as 'auto' is named by what 'auto' resolved to (offline: the built-in).
    auto = run_judge(tiny_ref.model_copy(update={"source": "auto"}), tiny_ref, cfg, ["unused"], 4)
    assert auto.settings["reference_model"]["source"] == BUILTIN, auto.settings["reference_model"]


def test_reference_file_is_matched_by_instruction(tiny_ref, tiny_model_dir, judgement_cache):
    cfg = JudgeConfig(model=str(tiny_model_dir), instructions="samples", reference=str(FIXTURE_REFERENCES))
    prompts = [FIXTURE_ROWS[3]["instruction"], FIXTURE_ROWS[1]["instruction"]]  # not in file order
    result = run_judge(tiny_ref, tiny_ref, cfg, prompts, 4)
    assert [r["reference_output"] for r in result.records] == [FIXTURE_ROWS[3]["output"], FIXTURE_ROWS[1]["output"]]
    assert result.settings["max_new_tokens"] == 4  # unset: the samples' length (sampling.max_new_tokens)
    assert run_judge(tiny_ref, tiny_ref, cfg.model_copy(update={"enabled": False}), prompts, 4) is None


@pytest.mark.parametrize(
    ("field", "content", "message"),
    [
        ("instructions", None, r"judge.instructions: .*missing.jsonl is not a file"),
        ("instructions", '{"instruction": "ok"}\n{"instruction": "unclosed\n',
         r"judge.instructions: .*line 2 is not valid JSON"),
        ("instructions", '{"instruction": "ok"}\n{"prompt": "wrong field"}\n',
         r"judge.instructions: .*line 2 has no non-empty `instruction`"),
        ("instructions", "\n", r"judge.instructions: .* has no rows"),
        ("instructions", '{"instruction": "ok"}\n{"instruction": "lost", "instruction": "kept"}\n',
         r"judge.instructions: .*bad.jsonl line 2: key 'instruction' twice in one object"),
        ("reference", '{"instruction": "Hello! How are you?"}\n',
         r"judge.reference: .*line 1 has no non-empty `output`"),
        # an empty reference loses to any answer; an instruction twice is judged and counted twice
        ("reference", '{"instruction": "Hello! How are you?", "output": " "}\n',
         r"judge.reference: .*line 1 has no non-empty `output` string"),
        ("instructions", '{"instruction": "a"}\n{"instruction": "b"}\n{"instruction": "a"}\n',
         r"judge.instructions: .*bad.jsonl line 3 repeats the instruction of .*bad.jsonl line 1 \(it would be judged, "
         r"and counted, twice\); remove one"),
        ("reference", '{"instruction": "Other", "output": "x"}\n',
         r"judge.reference: .*no output for 1 of 1 instructions \('Hello! How are you\?'\)"),
    ],
)
def test_broken_files_are_rejected_naming_field_and_line(tmp_path, field, content, message):
    path = tmp_path / "missing.jsonl"
    if content is not None:
        path = tmp_path / "bad.jsonl"
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        judge_inputs(JudgeConfig(**{field: str(path)}), ["Hello! How are you?"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[\n  {"instruction": "ok"},\n  {"instruction": "lost",\n   "instruction": "kept"}\n]\n',
         r"judge.instructions: .*bad.json: item 2 \(line 3\): key 'instruction' twice in one object"),
        ('[\n  {"instruction": "ok"},\n  {"prompt": "wrong field"}\n]\n',
         r"judge.instructions: .*bad.json item 2 \(line 3\) has no non-empty `instruction`"),
        ('[\n  {"instruction": "ok"},\n]\n', r"judge.instructions: .*bad.json line 3 is not valid JSON"),
        ('[\n  {"instruction": "ok"}\n  {"instruction": "no comma"}\n]\n',
         r"bad.json line 3 is not valid JSON \(Expecting ',' delimiter\)"),
    ],
)
def test_a_json_list_file_names_the_item_and_its_line(tmp_path, content, message):
    # AlpacaEval's files are one JSON list of hundreds of rows: "bad.json: key twice" left the row to find
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        judge_inputs(JudgeConfig(instructions=str(path)), ["Hello! How are you?"])


def test_fixture_instructions_are_in_alpaca_eval_schema():
    instructions, references = judge_inputs(JudgeConfig(instructions="fixture", reference=str(FIXTURE_REFERENCES)), [])
    rows = [json.loads(line) for line in FIXTURE_INSTRUCTIONS.read_text().splitlines()]
    assert len(instructions) == len(references) == 8 and all(set(r) == {"instruction", "dataset"} for r in rows)


# --- keys ---------------------------------------------------------------------------------------

def test_api_key_sources(monkeypatch):
    from prefect.blocks.system import Secret

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    remote = JudgeConfig(backend="openai", base_url="https://api.example.com/v1", model="gpt-x")
    with pytest.raises(ValueError, match="judge.api_key_env='OPENAI_API_KEY'.*judge.api_key_secret"):
        api_key(remote)
    local = remote.model_copy(update={"base_url": "http://127.0.0.1:9/v1"})
    assert api_key(local) == PLACEHOLDER_KEY
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert api_key(remote) == "sk-from-env"
    Secret(value="sk-from-block").save("judge-sources-api-key", overwrite=True)
    assert api_key(remote.model_copy(update={"api_key_secret": "judge-sources-api-key"})) == "sk-from-block"
    with pytest.raises(ValueError, match="judge.api_key_secret='no-such-api-key'"):
        api_key(remote.model_copy(update={"api_key_secret": "no-such-api-key"}))
    # Credentials in the URL stay out of the judge's identity (cache keys, results).
    with_password = remote.model_copy(update={"base_url": "https://user:hunter2@api.example.com/v1"})
    assert make_backend(with_password).identity == "openai:https://api.example.com/v1:gpt-x"


# --- the OpenAI-compatible path against a real local server -----------------------------------

@pytest.fixture(scope="module")
def served_judge(builtin_dir, tmp_path_factory):
    """`transformers serve` of the real SmolLM2-135M-Instruct on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cli = Path(sys.executable).with_name("transformers")
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the test machine's cores are shared
    with open(log, "w") as out:
        server = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port), str(builtin_dir)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"transformers serve did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", str(builtin_dir)  # the server names the model by its path
    finally:
        server.terminate()
        server.wait(timeout=30)


def _sent_keys(backend) -> list[str]:
    """The bearer keys the backend's real HTTP requests carried."""
    sent: list[str] = []
    backend.client._client.event_hooks["request"].append(lambda r: sent.append(r.headers["authorization"]))
    return sent


@pytest.mark.parametrize("key_source", ["env", "secret_block"])
def test_openai_endpoint_judges_with_the_key_and_never_records_it(
    served_judge, judgement_cache, monkeypatch, tmp_path, key_source
):
    from prefect.blocks.system import Secret

    base_url, model = served_judge
    key = f"sk-test-{key_source}-0123456789"
    monkeypatch.setenv("SMOLFLOW_JUDGE_TEST_API_KEY", "sk-not-this-one" if key_source == "secret_block" else key)
    cfg = JudgeConfig(backend="openai", base_url=base_url, model=model, api_key_env="SMOLFLOW_JUDGE_TEST_API_KEY")
    if key_source == "secret_block":
        Secret(value=key).save("judge-test-api-key", overwrite=True)
        cfg = cfg.model_copy(update={"api_key_secret": "judge-test-api-key"})  # the block wins over the variable

    backend = Counting(make_backend(cfg))
    sent = _sent_keys(backend.inner)
    instructions, outputs, references = [r["instruction"] for r in FIXTURE_ROWS[:2]], ["I don't know.", "No idea."], [
        r["output"] for r in FIXTURE_ROWS[:2]]
    result = judge(backend, instructions, outputs, references)
    assert backend.calls == 4 and sent == [f"Bearer {key}"] * 4
    assert all(r["verdict_tuned_as_a"].strip() and r["verdict_tuned_as_b"].strip() for r in result.records)
    assert result.pairs == 2 and result.wins + result.ties + result.losses == result.n
    assert result.n + sum(r["preference"] is None for r in result.records) == 2
    assert result.settings["judge_identity"] == f"openai:{base_url}:{model}"

    # Through the Prefect task too (verdicts now cached), and into the run folder: no key anywhere.
    via_task = judge_pairs(instructions, outputs, references, cfg)
    assert via_task.records == result.records
    run = ArtifactStore(str(tmp_path / "run"))
    write_judge(run, via_task)
    written = "".join(p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file())
    cached = "".join(p.read_text() for p in judgement_cache.glob("*.json"))
    for text in (via_task.model_dump_json(), written, cached):
        assert key not in text


def test_an_endpoint_that_cannot_judge_is_named_with_the_setting_to_fix(served_judge):
    from tasks.judge_backends import check_endpoint

    base_url, model = served_judge
    check_endpoint(JudgeConfig(backend="openai", base_url=base_url, model=model))  # answers: passes
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    down = JudgeConfig(backend="openai", base_url=nowhere, model=model)
    with pytest.raises(ValueError, match=rf"judge.base_url='{nowhere}': no answer \(ConnectError"):
        check_endpoint(down)
    # At run time, after the SDK's retries: the setting is named, and it is still a transient failure.
    from tasks.judge_backends import OpenAIBackend
    from tasks.runtime import is_transient

    with pytest.raises(ConnectionError, match=rf"judge.base_url='{nowhere}': no answer") as err:
        OpenAIBackend(nowhere, model, "EMPTY", max_retries=0).chat([[{"role": "user", "content": "hi"}]], 4)
    assert is_transient(err.value)


def test_stderr_is_na_for_few_pairs_or_all_ties_and_the_builtin_judge_is_called_weak(judgement_cache, tmp_path):
    from tasks.judge import WEAK_JUDGE

    many = [f"Q{i}" for i in range(12)]
    tied = judge(AlwaysA(), many, [f"t{i}" for i in range(12)], [f"r{i}" for i in range(12)],
                 settings={"backend": "local", "judge_model": "auto", "reference": "base"})
    assert (tied.n, tied.ties, tied.stderr, tied.stderr_note) == (12, 12, None, "every pair tied")
    assert tied.note == WEAK_JUDGE and "weak judge" in tied.note and "near 50%" in tied.note
    # ... and the report's summary says so next to the win rate, not only the judge's section
    from tasks.layout import RunPaths
    from tasks.reporting import summary_markdown
    from tasks.storage import ArtifactStore

    run = ArtifactStore(str(tmp_path / "run"))
    run.write_json(RunPaths.judge_summary, tied.model_dump(exclude={"records"}))
    assert summary_markdown(run) == "- judge: win rate 50.0% against 'base' (n=12 of 12 pairs; weak judge (see the judge section))\n"
    mixed = judge(PrefersStar(), many, [f"t{i}★" if i % 3 else f"t{i}" for i in range(12)], [f"r{i}" for i in range(12)],
                  settings={"backend": "openai", "judge_model": "big"})
    assert mixed.n == 12 and mixed.stderr is not None and mixed.stderr_note is None and mixed.note is None
    few = judge(PrefersStar(), many[:3], ["a★", "b", "c★"], ["x", "y", "z"])
    assert few.stderr is None and few.stderr_note == "fewer than 10 pairs"


def test_win_rate_is_alpaca_evals_and_kept_per_preference_list(tmp_path, monkeypatch):
    """alpaca_eval computes it once per list of preferences (its import is ~1.5 s of a cached re-run)."""
    from tasks.judge import win_rate

    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path))
    first = win_rate([2.0, 1.0, 1.5, 2.0])
    assert (first["win_rate"], first["n"], first["wins"], first["ties"], first["losses"]) == (62.5, 4, 2, 1, 1)
    kept = list((tmp_path / "win-rates").iterdir())
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == first
    assert win_rate([2.0, 1.0, 1.5, 2.0]) == first
    assert win_rate([1.0, 1.0])["win_rate"] == 0.0 and len(list((tmp_path / "win-rates").iterdir())) == 2
