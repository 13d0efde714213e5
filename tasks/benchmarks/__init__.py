"""One module per benchmark, each exposing the same small interface (see base.py)."""

from tasks.benchmarks.base import Benchmark, BenchmarkResult
from tasks.benchmarks.bbh import BBH
from tasks.benchmarks.gsm8k import GSM8K
from tasks.benchmarks.humaneval import HumanEval
from tasks.benchmarks.math import MATH
from tasks.benchmarks.mmlu import MMLU

REGISTRY: dict[str, Benchmark] = {b.name: b for b in (MMLU(), BBH(), GSM8K(), MATH(), HumanEval())}

__all__ = ["REGISTRY", "Benchmark", "BenchmarkResult"]
