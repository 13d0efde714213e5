"""The run's cross-checks: everything about a RunConfig that needs more than the config itself.

`tasks/config.py` checks each field on its own (types, ranges, names) and imports no task
module. What needs a registry or a file (benchmark subsets, custom benchmark definitions, judge
instructions and references) is checked here, once, at the start of a run, before any model
compute; `smolflow validate` runs the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.config import RunConfig


class ConfigError(ValueError):
    """A setting that names something that does not exist; the message names the field."""


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
            raise ConfigError(f"benchmarks[{i}].subsets: unknown {unknown} for {b.name}; choose from {', '.join(known)}")


def check_benchmark_data(config: RunConfig) -> None:
    """Each lm-eval benchmark's data reads and its few-shot examples exist apart from the scored items."""
    from tasks.benchmarks import REGISTRY
    from tasks.benchmarks.base import LmEvalBenchmark

    for i, b in enumerate(config.benchmarks):
        bench = REGISTRY[b.name]
        if not isinstance(bench, LmEvalBenchmark):
            continue
        try:
            bench.check(b)
        except ValueError as err:
            raise ConfigError(f"benchmarks[{i}] ({b.name}): {err}") from None


def check_run(config: RunConfig) -> Checked:
    """All cross-checks of a run, in one place; raises ConfigError/ValueError naming the field."""
    from tasks.benchmarks.custom import load_definitions
    from tasks.judge import judge_inputs

    check_benchmark_subsets(config)
    check_benchmark_data(config)
    custom = load_definitions(config.custom_benchmarks)
    instructions, references = judge_inputs(config.judge, config.sampling.prompts) if config.judge.enabled else ([], None)
    return Checked(custom=custom, judge_instructions=instructions, judge_references=references)
