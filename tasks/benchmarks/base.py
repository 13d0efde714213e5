"""The benchmark interface, and the lm-evaluation-harness runner the built-in benchmarks share.

Scoring goes through EleutherAI's lm-eval so prompts, few-shot sampling, answer extraction and
metrics match the harness other people quote. Offline, smolflow points lm-eval's stock task at
local files by writing a tiny task YAML that `include:`s the stock one and swaps the data source.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from flows.config import BenchmarkConfig
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


class Benchmark:
    """A benchmark: where its data comes from and how to score a model on it."""

    name: str
    hub: tuple[str, str | None]  # (dataset id, config) of the reference data
    fixture: str  # directory under tasks/fixtures/ in the hub schema
    reference: str  # where the default settings come from

    def data_files(self, cfg: BenchmarkConfig) -> dict[str, str] | None:
        """Local files per split, or None to use the hub dataset."""
        source = cfg.data
        if source == "auto":
            source = "fixture" if hub_offline() else "hub"
        if source == "hub":
            return None
        folder = FIXTURES / self.fixture if source == "fixture" else Path(source).expanduser()
        if not folder.exists():
            raise ValueError(f"benchmarks[{self.name}].data={cfg.data!r}: no such file or directory")
        if folder.is_file():
            return {"test": str(folder)}
        files = {f.stem.split("-")[0]: str(f) for f in sorted(folder.iterdir()) if f.suffix in (".jsonl", ".json", ".parquet")}
        if "test" not in files:
            raise ValueError(f"benchmarks[{self.name}].data={cfg.data!r}: need a test.jsonl (or .parquet) there")
        return files

    def evaluate(self, model, tokenizer, cfg: BenchmarkConfig) -> BenchmarkResult:
        raise NotImplementedError


class LmEvalBenchmark(Benchmark):
    """A benchmark scored by one of lm-eval's stock tasks."""

    stock_yaml: str  # path under lm_eval/tasks/
    metric: str  # primary "metric,filter" key in lm-eval's results
    apply_chat_template: bool = False

    def task_yaml(self, cfg: BenchmarkConfig) -> dict[str, Any]:
        import lm_eval

        stock = Path(lm_eval.__file__).parent / "tasks" / self.stock_yaml
        spec: dict[str, Any] = {"task": f"smolflow_{self.name}", "include": str(stock), "tag": []}
        files = self.data_files(cfg)
        if files is not None:
            builder = "parquet" if next(iter(files.values())).endswith(".parquet") else "json"
            spec |= {"dataset_path": builder, "dataset_name": None, "dataset_kwargs": {"data_files": files}}
            if "train" not in files:  # few-shot examples then come from the test split itself
                spec |= {"training_split": None, "fewshot_split": "test"}
        return spec

    def records(self, samples: list[dict]) -> list[dict[str, Any]]:
        key = self.metric.split(",")[0]
        filt = self.metric.split(",")[1] if "," in self.metric else None
        rows = []
        for s in samples:
            if filt and s.get("filter") != filt:
                continue
            rows.append(
                {
                    "doc_id": s["doc_id"],
                    "prompt": s["arguments"][0][0] if s.get("arguments") else None,
                    "output": s["resps"][0][0] if s.get("resps") else None,
                    "extracted": s["filtered_resps"][0] if s.get("filtered_resps") else None,
                    "gold": s.get("target"),
                    "correct": bool(s.get(key)),
                }
            )
        return rows

    def evaluate(self, model, tokenizer, cfg: BenchmarkConfig) -> BenchmarkResult:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as include:
            spec = self.task_yaml(cfg)
            Path(include, f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec))
            manager = TaskManager(include_path=include, include_defaults=False)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(model.device))
            out = simple_evaluate(
                model=lm,
                tasks=[spec["task"]],
                task_manager=manager,
                limit=cfg.limit,
                num_fewshot=cfg.num_fewshot,
                log_samples=True,
                apply_chat_template=self.apply_chat_template,
            )
        task_results = out["results"][spec["task"]]
        config = out["configs"][spec["task"]]
        metric, filt = (self.metric.split(",") + [""])[:2]
        stderr = task_results.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
        records = self.records(out["samples"][spec["task"]])
        return BenchmarkResult(
            name=self.name,
            score=float(task_results[self.metric]),
            stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
            n=len(records),
            metric=self.metric,
            settings={
                "engine": "lm-eval " + __import__("lm_eval").__version__,
                "stock_task": self.stock_yaml,
                "num_fewshot": config.get("num_fewshot"),
                "apply_chat_template": self.apply_chat_template,
                "generation_kwargs": config.get("generation_kwargs"),
                "answer_extraction": config.get("filter_list"),
                "limit": cfg.limit,
                "data": spec.get("dataset_kwargs", {}).get("data_files") or f"{self.hub[0]} ({self.hub[1]})",
                "reference": self.reference,
            },
            metrics={k: float(v) for k, v in task_results.items() if isinstance(v, (int, float)) and "," in k},
            records=records,
            seconds=time.perf_counter() - started,
        )
