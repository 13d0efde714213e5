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


TASK = """
from prefect import task

from tasks.caching import CODE


@task(cache_policy=CODE, persist_result=True)
def assess(name: str):
    from PKG.signs import assess_sign  # lazily, as smolflow's tasks import

    return assess_sign(name)
"""
SIGNS = """
from pydantic import BaseModel


class Sign(BaseModel):
    name: str
{extra}

def assess_sign(name: str) -> Sign:
    return Sign(name=name{call})
"""


def test_a_change_in_a_module_the_task_reaches_computes_afresh(tmp_path, monkeypatch):
    """The task's own source is the same; the module whose function it calls (lazily) changed, and
    the model it returns gained a field (health's Sign.checked). Keyed on the task function's
    source alone (Prefect's TASK_SOURCE), the result cached by the older code came back without it
    and the next task failed on it. A module of the package the task does not reach changes nothing."""
    import importlib
    import sys
    import uuid

    from tasks import code_version

    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = f"shaped_{uuid.uuid4().hex[:8]}"  # a new key for each test session's cache
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "task.py").write_text(TASK.replace("PKG", pkg))

    def new_process_runs(extra: str, call: str, unrelated: str):
        (tmp_path / pkg / "signs.py").write_text(SIGNS.format(extra=extra, call=call))
        (tmp_path / pkg / "unrelated.py").write_text(unrelated)
        for name in [m for m in sys.modules if m.startswith(pkg)]:
            del sys.modules[name]
        for cached in (code_version._reached, code_version.source_closure, code_version.code_digest):
            cached.cache_clear()
        importlib.invalidate_caches()
        return importlib.import_module(f"{pkg}.task").assess("overfitting", return_state=True)

    try:
        first = new_process_runs("", "", "X = 1\n")
        assert first.name == "Completed" and first.result().name == "overfitting"
        # Not reached by the task: still the same code as far as its result goes.
        assert new_process_runs("", "", "X = 2\n").name == "Cached"
        changed = new_process_runs("    checked: bool = False\n", ", checked=True", "X = 2\n")
        assert changed.name == "Completed", changed  # not the older code's result
        assert changed.result().checked is True
        assert new_process_runs("    checked: bool = False\n", ", checked=True", "X = 2\n").name == "Cached"
    finally:
        for name in [m for m in sys.modules if m.startswith(pkg)]:
            del sys.modules[name]


def test_the_code_of_a_cached_task_is_every_module_it_reaches():
    """tasks/code_version.py reads what a task's module reaches without importing it: lazy imports
    inside functions, and modules started by name (DDP's ranks run `-m tasks.train_worker`,
    HumanEval's sandbox `sandbox_init.py` beside tasks/sandbox.py)."""
    from tasks.code_version import ROOT, library_versions, source_closure

    def reached(module):
        return {p.relative_to(ROOT).as_posix() for p in source_closure(module)}

    training, evaluation = reached("tasks.training"), reached("tasks.evaluation")
    assert {"tasks/training.py", "tasks/train_worker.py", "tasks/packed_attention.py", "tasks/lm_head_cpu.py"} <= training
    assert {"tasks/benchmarks/scorers.py", "tasks/benchmarks/fast_lm.py", "tasks/generation.py",
            "tasks/sandbox_init.py", "tasks/mathcheck.py"} <= evaluation
    assert not any(p.startswith(("flows/", "deployments/")) for p in training | evaluation)
    assert "tasks/reporting.py" not in evaluation and "tasks/gate.py" not in training  # not the whole package
    assert any(v.startswith("transformers==") for v in library_versions())


def test_the_built_in_models_conversion_is_keyed_on_its_code(monkeypatch):
    """The built-in model is converted once per machine, into a folder named by the GGUF's hash and
    transformers' version; a fix to smolflow's conversion (`_convert`) now converts again too."""
    from tasks import models

    before, original, calls = models.builtin_target(), models._convert, []

    def _convert(gguf, target):  # the conversion as changed by a fix: one more step around the same one
        calls.append(target)
        original(gguf, target)

    monkeypatch.setattr(models, "_convert", _convert)
    after = models.builtin_target()
    assert after != before and after.parent == before.parent
    assert after.name.split("-c")[0] == before.name.split("-c")[0]  # the same GGUF
    assert calls == []  # naming the folder reads the conversion's source; it converts nothing


def test_every_cached_task_is_keyed_on_its_code():
    """A task that caches without `Code` in its policy would hand back what older code computed
    (tasks/caching.py): every Prefect task under tasks/ is either not cached or keyed on it."""
    import importlib
    import pkgutil

    import tasks
    from prefect import Task
    from prefect.cache_policies import NO_CACHE, CompoundCachePolicy

    from tasks.caching import Code

    def parts(policy):
        return [p for sub in policy.policies for p in parts(sub)] if isinstance(policy, CompoundCachePolicy) else [policy]

    found = {}
    for info in pkgutil.walk_packages(tasks.__path__, "tasks."):
        for name, obj in vars(importlib.import_module(info.name)).items():
            if isinstance(obj, Task):
                found[f"{obj.fn.__module__}.{obj.fn.__name__}"] = parts(obj.cache_policy)
    cached = {name: policies for name, policies in found.items() if policies != [NO_CACHE]}
    assert {"tasks.training.train_sft", "tasks.evaluation.run_benchmark", "tasks.generation.generate_samples"} <= set(cached)
    assert not [name for name, policies in cached.items() if not any(isinstance(p, Code) for p in policies)]


def test_a_remembered_code_digest_follows_an_edit(tmp_path, monkeypatch):
    """The code digest is remembered under its files' identity (a cached re-run parsed ~70 files,
    ~0.2 s): a second process reads it without parsing anything, and an edit to a reached file,
    here the helper a lazy import reaches, is a new digest."""
    import importlib
    import os
    import sys
    import time

    from tasks import code_version

    monkeypatch.setenv("SMOLFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "memo_pkg").mkdir()
    files = {"__init__.py": "", "task.py": "def go():\n    from memo_pkg.helper import f\n    return f()\n",
             "helper.py": "def f():\n    return 1\n"}
    for name, text in files.items():
        (tmp_path / "memo_pkg" / name).write_text(text)
        os.utime(tmp_path / "memo_pkg" / name, ns=(time.time_ns() - 10**10,) * 2)  # written 10 s ago

    def new_process():
        for cached in (code_version._reached, code_version.source_closure, code_version.code_digest):
            cached.cache_clear()
        sys.modules.pop("memo_pkg.task", None)
        importlib.invalidate_caches()
        importlib.import_module("memo_pkg.task")

    try:
        new_process()
        first = code_version.code_digest("memo_pkg.task")
        assert any(p.name == "helper.py" for p in code_version.source_closure("memo_pkg.task"))
        new_process()
        with monkeypatch.context() as m:  # remembered: nothing is read or parsed
            m.setattr(code_version, "source_closure", lambda module: (_ for _ in ()).throw(AssertionError(module)))
            assert code_version.code_digest("memo_pkg.task") == first
        (tmp_path / "memo_pkg" / "helper.py").write_text("def f():\n    return 2\n")
        new_process()
        assert code_version.code_digest("memo_pkg.task") != first
    finally:
        for name in [m for m in sys.modules if m.startswith("memo_pkg")]:
            del sys.modules[name]
        for cached in (code_version._reached, code_version.source_closure, code_version.code_digest):
            cached.cache_clear()
