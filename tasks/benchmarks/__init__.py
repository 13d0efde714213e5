"""One module per benchmark, each exposing the same small interface (see base.py)."""

from tasks.benchmarks.base import Benchmark, BenchmarkResult
from tasks.benchmarks.gsm8k import GSM8K

REGISTRY: dict[str, Benchmark] = {b.name: b for b in (GSM8K(),)}

__all__ = ["REGISTRY", "Benchmark", "BenchmarkResult"]
