"""What a cached score is keyed on beyond its settings: the benchmark's items as they are now (an
edited local file, or `data: auto` meaning the hub online and the fixture offline) and the judge a
judge_rubric benchmark is scored by (its model's content, not its path)."""

import shutil
import socket

from tasks.benchmarks import REGISTRY
from tasks.config import BenchmarkConfig, JudgeConfig
from tasks.evaluation import run_benchmark
from tasks.runtime import FIXTURES


def test_an_edited_benchmark_file_is_scored_afresh(tiny_ref, tmp_path):
    shutil.copytree(FIXTURES / "gsm8k", tmp_path / "gsm8k")
    cfg = BenchmarkConfig(name="gsm8k", limit=2, num_fewshot=0, data=str(tmp_path / "gsm8k"))
    first = run_benchmark(tiny_ref, cfg, return_state=True)
    assert first.name == "Completed", first
    assert run_benchmark(tiny_ref, cfg, return_state=True).name == "Cached"
    test = tmp_path / "gsm8k" / "test.jsonl"
    lines = test.read_text().splitlines(keepends=True)
    test.write_text(lines[1] + lines[0] + "".join(lines[2:]))  # the same items, the first two swapped
    again = run_benchmark(tiny_ref, cfg, return_state=True)
    assert again.name == "Completed", "a score of the file as it was answered for the file as it is"
    golds = [[r["gold"] for r in s.result().records] for s in (first, again)]
    assert golds[0] == golds[1][::-1] and golds[0][0] != golds[0][1]
    assert again.result().provenance["sha256"] != first.result().provenance["sha256"]


def test_data_auto_is_keyed_on_what_it_means_here(monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as sock:  # a local port nothing listens on: the hub "answers" with a refusal
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]

    gsm8k = REGISTRY["gsm8k"]
    offline = gsm8k.data_identity(BenchmarkConfig(name="gsm8k"))
    assert offline == gsm8k.data_identity(BenchmarkConfig(name="gsm8k", data="fixture")) and offline.startswith("files:")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")  # no hub answers: unresolved
    online = gsm8k.data_identity(BenchmarkConfig(name="gsm8k"))
    assert online == "hub:openai/gsm8k:main@unresolved" != offline


def test_a_judge_rubric_score_follows_the_judges_content_not_its_path(tiny_model_dir, builtin_dir, tmp_path):
    from tasks.benchmarks.custom import JudgeIdentity

    link = tmp_path / "judge"
    link.symlink_to(tiny_model_dir)
    key = JudgeIdentity().compute_key(None, {"judge_cfg": JudgeConfig(model=str(link))}, {})
    assert key == JudgeIdentity().compute_key(None, {"judge_cfg": JudgeConfig(model=str(tiny_model_dir))}, {})
    link.unlink()
    link.symlink_to(builtin_dir)  # the same setting, another model
    assert JudgeIdentity().compute_key(None, {"judge_cfg": JudgeConfig(model=str(link))}, {}) != key
    assert JudgeIdentity().compute_key(None, {"judge_cfg": None}, {}) is None


def test_offline_a_hub_benchmark_is_keyed_on_its_cached_revision(monkeypatch, tmp_path):
    """Offline, hub data comes from the local cache: its revision (refs/main) is the one recorded, so
    scores of two cached revisions are not taken for the same items ('unresolved' both)."""
    from huggingface_hub import constants

    from tasks.benchmarks.provenance import hub_identity

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_identity(("openai/gsm8k", "main")) == "hub:openai/gsm8k:main@unresolved"  # not cached
    ref = tmp_path / "datasets--openai--gsm8k" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("e53f048856ff4f594e959d75785d2c2d37b678ee")
    assert hub_identity(("openai/gsm8k", "main")) == "hub:openai/gsm8k:main@e53f048856ff4f594e959d75785d2c2d37b678ee"


SHAPED = '''
from pydantic import BaseModel
from prefect import task
from prefect.cache_policies import INPUTS
from tasks.caching import CODE


class Sign(BaseModel):
    name: str
{extra}

class Report(BaseModel):
    signs: list[Sign]


@task(cache_policy=INPUTS + CODE, persist_result=True)
def assess(name: str) -> Report:
    return Report(signs=[Sign(name=name)])
'''


def test_a_result_model_that_gained_a_field_is_computed_afresh(tmp_path, monkeypatch):
    """The task's source is the same, the model it returns gained a field (health's Sign.checked):
    the result cached by the older code came back without it, and the next task failed on it."""
    import importlib
    import sys
    import uuid

    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"shaped_{uuid.uuid4().hex[:8]}"  # a new key for each test session's cache
    states = []
    for extra in ("", "    checked: bool = True\n"):
        (tmp_path / f"{name}.py").write_text(SHAPED.replace("{extra}", extra))
        sys.modules.pop(name, None)
        importlib.invalidate_caches()
        module = importlib.import_module(name)
        states.append(module.assess("overfitting", return_state=True))
        again = module.assess("overfitting", return_state=True)
        assert again.name == "Cached" and again.result().signs[0].name == "overfitting"
    sys.modules.pop(name, None)
    assert [s.name for s in states] == ["Completed", "Completed"]  # not the older code's result
    assert states[1].result().signs[0].checked is True
