"""The benchmark interface, and the lm-evaluation-harness runner the built-in benchmarks share.

Scoring goes through EleutherAI's lm-eval so prompts, few-shot sampling, answer extraction and
metrics match the harness other people quote. smolflow loads the stock task YAML (with its
`include:`s and `!function`s resolved by lm-eval's own loader) and overrides only the task name
and the data source (local json/parquet files in the hub schema, offline), plus, for a benchmark
split into subsets (MMLU subjects, BBH tasks), one such task per chosen subset.
"""

from __future__ import annotations

import abc
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.config import BenchmarkConfig
from tasks.runtime import FIXTURES, hub_offline


class BenchmarkResult(BaseModel):
    name: str
    score: float  # the primary metric, in [0, 1]
    stderr: float | None
    n: int
    metric: str
    settings: dict[str, Any]  # n-shot, chat template, generation, extraction, data source
    metrics: dict[str, float]  # every metric lm-eval reported
    records: list[dict[str, Any]]  # per item: prompt, output, extracted, gold, correct
    seconds: float


class Benchmark(abc.ABC):
    """A benchmark: where its data comes from and how to score a model on it."""

    name: str
    hub: tuple[str, str | None]  # (dataset id, config) of the reference data
    fixture: str  # directory under tasks/fixtures/ in the hub schema
    reference: str  # where the default settings come from

    def local_source(self, cfg: BenchmarkConfig) -> Path | None:
        """The local file or folder `cfg.data` names ('auto' offline: the fixture), or None for the hub."""
        source = cfg.data
        if source == "auto":
            source = "fixture" if hub_offline() else "hub"
        if source == "hub":
            return None
        folder = FIXTURES / self.fixture if source == "fixture" else Path(source).expanduser()
        if not folder.exists():
            raise ValueError(f"benchmarks[{self.name}].data={cfg.data!r}: no such file or directory")
        return folder

    def data_files(self, cfg: BenchmarkConfig) -> dict[str, str] | None:
        """Local files per split, or None to use the hub dataset."""
        folder = self.local_source(cfg)
        if folder is None:
            return None
        if folder.is_file():
            return {"test": str(folder)}
        files = {f.stem.split("-")[0]: str(f) for f in sorted(folder.iterdir()) if f.suffix in (".jsonl", ".json", ".parquet")}
        if "test" not in files:
            raise ValueError(f"benchmarks[{self.name}].data={cfg.data!r}: need a test.jsonl (or .parquet) there")
        return files

    subsets: tuple[str, ...] = ()  # named parts (MMLU subjects, BBH tasks); empty: not split

    @abc.abstractmethod
    def evaluate(self, model, tokenizer, cfg: BenchmarkConfig) -> BenchmarkResult:
        """Score a loaded model on this benchmark."""


def stderr_of_mean(values: list) -> float | None:
    """Standard error of a mean of 0/1 (or real) scores; None for fewer than two."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a local .json/.jsonl/.parquet file."""
    if path.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    text = Path(path).read_text()
    if path.endswith(".json") and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, default=_plain) + "\n" for r in rows))
    return str(path)


def _plain(value):  # numpy values from parquet rows
    return value.tolist() if hasattr(value, "tolist") else str(value)


class LmEvalBenchmark(Benchmark):
    """A benchmark scored by one of lm-eval's stock tasks (one per subset, if split)."""

    stock_yaml: str  # path under lm_eval/tasks/
    metric: str  # primary "metric,filter" key in lm-eval's results
    apply_chat_template: bool = False

    def stock(self, path: str | None = None) -> dict[str, Any]:
        """The stock task config, includes and !function tags resolved by lm-eval's loader."""
        import lm_eval
        from lm_eval.tasks._yaml_loader import load_yaml

        return load_yaml(Path(lm_eval.__file__).parent / "tasks" / (path or self.stock_yaml))

    def overrides(self) -> dict[str, Any]:
        """Keys to change in the stock config besides the data source (none by default)."""
        return {}

    def local(self, files: dict[str, str], stock: dict[str, Any]) -> dict[str, Any]:
        """Overrides that point a stock config at local files in the hub schema."""
        builder = "parquet" if next(iter(files.values())).endswith(".parquet") else "json"
        spec = {"dataset_path": builder, "dataset_name": None, "dataset_kwargs": {"data_files": files}}
        fixed_shots = (stock.get("fewshot_config") or {}).get("samples")  # e.g. Minerva's 4 examples
        if not fixed_shots and "train" not in files and "dev" not in files:
            spec |= {"training_split": None, "fewshot_split": "test"}  # shots from the test split itself
        return spec

    def task_configs(self, cfg: BenchmarkConfig, workdir: Path) -> list[dict[str, Any]]:
        """lm-eval task configs to run; subclasses split by subset."""
        spec = self.stock() | {"task": f"smolflow_{self.name}", "tag": []} | self.overrides()
        files = self.data_files(cfg)
        return [spec | self.local(files, spec)] if files is not None else [spec]

    def record(self, sample: dict, key: str) -> dict[str, Any]:
        """One per-item record from an lm-eval sample of a generative task."""
        return {
            "doc_id": sample["doc_id"],
            "prompt": sample["arguments"][0][0] if sample.get("arguments") else None,
            "output": sample["resps"][0][0] if sample.get("resps") else None,
            "extracted": sample["filtered_resps"][0] if sample.get("filtered_resps") else None,
            "gold": sample.get("target"),
            "correct": bool(sample.get(key)),
        }

    def records(self, samples: list[dict], subset: str | None = None) -> list[dict[str, Any]]:
        key = self.metric.split(",")[0]
        filt = self.metric.split(",")[1] if "," in self.metric else None
        rows = [self.record(s, key) for s in samples if not filt or s.get("filter") == filt]
        return [r | {"subset": subset} for r in rows] if subset else rows

    def evaluate(self, model, tokenizer, cfg: BenchmarkConfig) -> BenchmarkResult:
        # lm-eval's HF backend plus shared-prefix KV reuse (tasks/benchmarks/fast_lm.py): the same
        # per-item results as HFLM, several times faster on few-shot and multiple-choice work.
        from tasks.benchmarks.fast_lm import ENGINE, SharedPrefixLM

        lm = SharedPrefixLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(model.device))
        result = self.evaluate_lm(lm, cfg)
        result.settings["engine"] = f"{ENGINE} (lm-eval {__import__('lm_eval').__version__} HFLM + shared-prefix KV cache)"
        result.settings["dtype"] = str(model.dtype).removeprefix("torch.")
        return result

    def evaluate_lm(self, lm, cfg: BenchmarkConfig) -> BenchmarkResult:
        """Score any lm-eval `LM` (the HF model above, or e.g. one that answers from the gold)."""
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            specs = self.task_configs(cfg, Path(workdir))
            out = simple_evaluate(
                model=lm,
                tasks=specs,
                task_manager=TaskManager(include_defaults=False),
                limit=cfg.limit,
                num_fewshot=cfg.num_fewshot,
                log_samples=True,
                apply_chat_template=self.apply_chat_template,
            )
        names = [s["task"] for s in specs]
        metric, filt = (self.metric.split(",") + [""])[:2]
        records, metrics = [], {}
        for spec in specs:
            task = spec["task"]
            subset = task.removeprefix(f"smolflow_{self.name}_") if self.subsets else None
            records += self.records(out["samples"][task], subset)
            for k, v in out["results"][task].items():
                if isinstance(v, (int, float)) and "," in k:
                    metrics[f"{subset}/{k}" if len(specs) > 1 else k] = float(v)
        if len(specs) == 1:
            score = out["results"][names[0]][self.metric]
            stderr = out["results"][names[0]].get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
        else:  # micro-average over every item of every subset, as lm-eval's weight_by_size groups do
            score = sum(r["correct"] for r in records) / len(records)
            stderr = stderr_of_mean([float(r["correct"]) for r in records])
        config = out["configs"][names[0]]
        return BenchmarkResult(
            name=self.name,
            score=float(score),
            stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
            n=len(records),
            metric=self.metric,
            settings={
                "engine": "lm-eval " + __import__("lm_eval").__version__,
                "stock_task": self.stock_yaml,
                "subsets": [n.removeprefix(f"smolflow_{self.name}_") for n in names] if self.subsets else None,
                "num_fewshot": config.get("num_fewshot"),
                "apply_chat_template": self.apply_chat_template,
                "output_type": config.get("output_type"),
                "generation_kwargs": config.get("generation_kwargs"),
                "answer_extraction": config.get("filter_list") or self.extraction,
                "limit": f"{cfg.limit} per subset" if self.subsets and cfg.limit else cfg.limit,
                "data": (specs[0].get("dataset_kwargs") or {}).get("data_files") or f"{self.hub[0]} ({self.hub[1]})",
                "reference": self.reference,
            },
            metrics=metrics,
            records=records,
            seconds=time.perf_counter() - started,
        )

    extraction: str = "lm-eval stock task's (see stock_task)"
