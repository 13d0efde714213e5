"""The benchmark interface, and the lm-evaluation-harness runner the built-in benchmarks share.

Scoring goes through EleutherAI's lm-eval so prompts, few-shot sampling, answer extraction and
metrics match the harness other people quote. smolflow loads the stock task YAML (with its
`include:`s and `!function`s resolved by lm-eval's own loader) and overrides only the task name
and the data source (local json/parquet files in the hub schema, offline), plus, for a benchmark
split into subsets (MMLU subjects, BBH tasks), one such task per chosen subset.
"""

from __future__ import annotations

import abc
import copy
import functools
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from tasks.benchmarks.rows import need_strings, read_numbered, read_rows, write_jsonl  # noqa: F401 - the benchmarks' row helpers
from tasks.config import BenchmarkConfig
from tasks.console import quiet_bars
from tasks.runtime import FIXTURES, git_commit, hub_offline, split_of

if TYPE_CHECKING:
    from tasks.benchmarks.parts import Part


class BenchmarkResult(BaseModel):
    name: str
    score: float  # the primary metric, in [0, 1]
    stderr: float | None
    n: int
    metric: str
    settings: dict[str, Any]  # n-shot, chat template, generation, extraction, data source
    metrics: dict[str, float]  # every metric lm-eval reported
    records: list[dict[str, Any]]  # per item: prompt, output, extracted, gold, correct, lm-eval's metrics
    seconds: float
    # Where the items came from and whether the score may sit next to published ones (provenance.py).
    provenance: dict[str, Any] = Field(default_factory=dict)
    comparability_key: str | None = None  # equal keys: scores of different models on the same footing
    comparability: dict[str, Any] = Field(default_factory=dict)  # the parts hashed into the key
    # lm-eval's own results_<date>.json and samples_<task>_<date>.jsonl, by file name, for the caller
    # to store next to smolflow's files; kept out of model_dump() (summary.json) for their size.
    lm_eval_files: dict[str, str] = Field(default_factory=dict, exclude=True)
    # An item shard's per-item metric values by "metric,filter" (parts.py), to merge shards exactly.
    item_values: dict[str, list[float]] = Field(default_factory=dict, exclude=True)


DATA_WORDS = ("auto", "hub", "fixture")  # the values of `data` that are not paths (local_source)


def did_you_mean(data: str) -> str:
    """'did you mean 'fixture'? ' for a near miss of a DATA_WORDS value (a typo reads as a path)."""
    import difflib

    near = difflib.get_close_matches(data, DATA_WORDS, n=1)
    return f"did you mean {near[0]!r}? " if near else ""


class Benchmark(abc.ABC):
    """A benchmark: where its data comes from and how to score a model on it."""

    name: str
    hub: tuple[str, str | None]  # (dataset id, config) of the reference data
    fixture: str  # directory under tasks/fixtures/ in the hub schema
    reference: str  # where the default settings come from
    row_fields: tuple[str, ...] = ()  # string fields every local row needs (checked in data_files)

    def local_source(self, cfg: BenchmarkConfig) -> Path | None:
        """The local file or folder `cfg.data` names ('auto' offline: the fixture), or None for the hub."""
        source = cfg.data
        if source == "auto":
            source = "fixture" if hub_offline() else "hub"
        if source == "hub":
            return None
        folder = FIXTURES / self.fixture if source == "fixture" else Path(source).expanduser()
        if not folder.exists():
            raise ValueError(f"benchmarks[{self.name}].data={cfg.data!r}: no such file or directory; "
                             f"{did_you_mean(cfg.data)}use auto, hub, fixture or a local file/folder in the hub schema")
        return folder

    def auto_source(self, offline: bool) -> str:
        """What `data: auto` reads here (for `smolflow validate`'s resolved settings)."""
        if offline:
            return f"fixture (tasks/fixtures/{self.fixture}: hand-written items, not comparable to published scores)"
        return f"hub {self.hub[0]}"

    def data_identity(self, cfg: BenchmarkConfig) -> str:
        """What the items are now, for the cache key: the local files' bytes, or the hub id and revision
        (`auto` resolved), so an edited file or a switch between fixture and hub is scored afresh."""
        from tasks.benchmarks.provenance import files_digest, hub_identity

        folder = self.local_source(cfg)
        return hub_identity(self.hub) if folder is None else "files:" + files_digest(folder)

    def data_files(self, cfg: BenchmarkConfig) -> dict[str, str] | None:
        """Local files per split (each row checked to parse), or None to use the hub dataset."""
        folder = self.local_source(cfg)
        if folder is None:
            return None
        if folder.is_file():
            files = {"test": str(folder)}
        else:
            files = {split_of(f): str(f) for f in sorted(folder.iterdir()) if f.suffix in (".jsonl", ".json", ".parquet")}
        if "test" not in files:
            raise ValueError(f"benchmarks[{self.name}].data={cfg.data!r}: need a test.jsonl (or .parquet) there")
        for path in files.values():  # a broken line is named here (file:line), not deep inside `datasets`
            for where, row in read_numbered(path):
                need_strings(where, row, self.row_fields)
        return files

    subsets: tuple[str, ...] = ()  # named parts (MMLU subjects, BBH tasks); empty: not split

    # For ordering concurrent tasks only (Ray gets the longest first, so a long one never starts
    # last): the full benchmark's items and a rough cost per item against an MMLU question, from
    # the per-item rates in docs/performance.md (MMLU 0.23 s, BBH 0.36, MATH 1.35, GSM8K 1.62,
    # HumanEval 2.18). Scores never depend on them.
    full_items: int = 1000
    cost_per_item: float = 1.0

    def work(self, cfg: BenchmarkConfig) -> float:
        """Estimated work of scoring `cfg` (items x cost per item), to order concurrent tasks."""
        parts = len(self.subsets) or 1
        chosen = len(cfg.subsets) if cfg.subsets else parts
        per_part = self.full_items / parts
        return chosen * min(cfg.limit or per_part, per_part) * self.cost_per_item

    @abc.abstractmethod
    def evaluate(self, model, tokenizer, cfg: BenchmarkConfig, part: Part | None = None) -> BenchmarkResult:
        """Score a loaded model on this benchmark (on one part of its items: parts.py)."""


def record_smolflow_commit() -> None:
    """lm-eval's results record the git commit of the working directory, whatever repository a run
    was started in, and outside one git prints 'fatal: not a git repository' (twice an evaluation):
    they record smolflow's own commit instead (None when smolflow is not a checkout). And their
    environment (torch's collect_env: `pip list`, gcc, nvcc, lscpu... as subprocesses) is taken once
    a process, not once an evaluation: 1.3 s each here, 15 s per item-shard lot on 2 loaded cores."""
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = git_commit
    lm_eval.evaluator.add_env_info = _add_env_info_once


@functools.cache
def _env_info() -> dict[str, Any]:
    from lm_eval.loggers.utils import add_env_info

    info: dict[str, Any] = {}
    add_env_info(info)
    return info


def _add_env_info_once(storage: dict[str, Any]) -> None:
    storage.update(copy.deepcopy(_env_info()))


def arrow_in(specs: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    """Point `datasets`' Arrow copies of local benchmark files into this evaluation's own folder.

    `datasets` keeps one copy per file path and modification time in ~/.cache/huggingface/datasets
    and never deletes any: MMLU's per-subject files are written anew into a temporary folder for
    every evaluation, so each evaluation left a copy of the data and a lock file per subject there
    (57 a night for full MMLU, for as long as the nightly ran). Converting the files again costs
    less than a second; hub datasets keep datasets' own cache (one copy per revision)."""
    out = []
    for spec in specs:
        kwargs = spec.get("dataset_kwargs") or {}
        if kwargs.get("data_files"):
            spec = spec | {"dataset_kwargs": kwargs | {"cache_dir": str(workdir / "arrow")}}
        out.append(spec)
    return out


def stderr_of_mean(values: list) -> float | None:
    """Standard error of a mean of 0/1 (or real) scores; None for fewer than two."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


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
            # lm-eval wants some few-shot split; at 0-shot none is read, and fewshot_source() refuses
            # any n-shot above 0 drawn from it (examples must never be scored items).
            spec |= {"training_split": None, "fewshot_split": "test"}
        return spec

    def task_configs(self, cfg: BenchmarkConfig, workdir: Path) -> list[dict[str, Any]]:
        """lm-eval task configs to run; subclasses split by subset."""
        spec = self.stock() | {"task": f"smolflow_{self.name}", "tag": []} | self.overrides()
        files = self.data_files(cfg)
        return [self.shots(spec | self.local(files, spec) if files is not None else spec, cfg)]

    def shots(self, spec: dict[str, Any], cfg: BenchmarkConfig) -> dict[str, Any]:
        """Set the n-shot in the task config itself: lm-eval ignores simple_evaluate's num_fewshot
        for a task whose config says 0 (it logs and moves on), which silently kept MMLU 0-shot."""
        return spec | {"num_fewshot": cfg.num_fewshot if cfg.num_fewshot is not None else spec.get("num_fewshot") or 0}

    def variant(self, cfg: BenchmarkConfig) -> str | None:
        """The prompt format/variant in use (MMLU format, BBH variant); None where there is one only."""
        return None

    def metric_for(self, cfg: BenchmarkConfig) -> str:
        """The primary "metric,filter" key for these settings."""
        return self.metric

    def stock_for(self, cfg: BenchmarkConfig) -> str:
        """The stock task YAML these settings run."""
        return self.stock_yaml

    def check(self, cfg: BenchmarkConfig) -> list[dict[str, Any]]:
        """Every data and few-shot check, without a model; returns the few-shot record per task."""
        from tasks.benchmarks.fewshot import fewshot_source

        if self.local_source(cfg) is None and hub_offline():
            raise ValueError(f"benchmarks[{self.name}].data={cfg.data!r} needs the Hugging Face hub, but "
                             "HF_HUB_OFFLINE=1: give a local mirror in the hub schema, or 'fixture'")
        with tempfile.TemporaryDirectory() as workdir:
            return [fewshot_source(self.name, spec) for spec in self.task_configs(cfg, Path(workdir))]

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

    def records(self, samples: list[dict], metric: str, metric_names: list[str], subset: str | None = None) -> list[dict[str, Any]]:
        """Per-item records, each with lm-eval's own per-document metric values (`metrics`)."""
        from tasks.benchmarks.fewshot import doc_metrics

        key, _, filt = metric.partition(",")
        rows = [self.record(s, key) | {"metrics": doc_metrics(s, metric_names)}
                for s in samples if not filt or filt == "none" or s.get("filter") == filt]
        return [r | {"subset": subset} for r in rows] if subset else rows

    def evaluate(self, model, tokenizer, cfg: BenchmarkConfig, part: Part | None = None) -> BenchmarkResult:
        # lm-eval's HF backend plus shared-prefix KV reuse (tasks/benchmarks/fast_lm.py): the same
        # per-item results as HFLM, several times faster on few-shot and multiple-choice work.
        from tasks.benchmarks.fast_lm import ENGINE, engine

        lm = engine(model, tokenizer, cfg.batch_size)
        result = self.evaluate_lm(lm, cfg, part)
        # The model backend under lm-eval ("engine", in the key, stays what evaluate_lm keyed): a shard's
        # merged result is keyed from these settings again and must get the whole run's key.
        result.settings["backend"] = f"{ENGINE} (lm-eval's HFLM + shared-prefix KV cache)"
        result.settings["freed_memory_kept"] = lm.keeps_freed_memory  # a speed lever, same maths: not in comparability
        packs, why = lm.scoring_choice  # likewise a speed lever
        result.settings["scoring_passes"] = ("packed, shared prefixes" if packs else "HFLM batches") + f" ({why})"
        return result

    def evaluate_lm(self, lm, cfg: BenchmarkConfig, part: Part | None = None) -> BenchmarkResult:
        """Score any lm-eval `LM` (the HF model above, or e.g. one that answers from the gold)."""
        from lm_eval import simple_evaluate
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.tasks import TaskManager

        from tasks.benchmarks.fewshot import fewshot_source, lm_eval_files
        from tasks.benchmarks.parts import PartLM, describe, restrict
        from tasks.benchmarks.provenance import arrangement

        record_smolflow_commit()
        started = time.perf_counter()
        tracker = EvaluationTracker()
        with tempfile.TemporaryDirectory() as workdir, quiet_bars():  # lm-eval's tqdm bars, unless verbose
            specs = arrow_in(self.task_configs(cfg, Path(workdir)), Path(workdir))
            shots = [fewshot_source(self.name, spec) for spec in specs]  # refuses examples from scored items
            out = simple_evaluate(
                model=PartLM(lm, part) if part else lm,
                tasks=specs,
                task_manager=TaskManager(include_defaults=False),
                limit=cfg.limit,
                num_fewshot=None,  # set per task config (see shots())
                log_samples=True,
                apply_chat_template=self.apply_chat_template,
                evaluation_tracker=tracker,
            )
            values = restrict(out, part) if part else {}
            files = lm_eval_files(out, tracker)
        model = getattr(lm, "model", None)
        dtype = getattr(model, "dtype", None)  # None: an LM that is no torch model
        how = arrangement(model, cfg.batch_size) if dtype is not None else {}
        choice = getattr(lm, "scoring_choice", None)
        if how and choice is not None and model.device.type != "cpu" and any(
                s.get("output_type") in ("loglikelihood", "multiple_choice") for s in specs):
            # Off the CPU a timing probe picks the log-likelihood passes per model (scoring_probe.py),
            # so a base and a tuned model, or two nights, can score MMLU one way and the other; in bf16
            # the two ways round differently (acc moved on 1 of 12 fixture items here), so it is a
            # part of the arrangement. On a CPU the passes are always the packed ones.
            how["scoring"] = "packed" if choice[0] else "HFLM batches"
        result = self.result(cfg, specs, shots, out, files, time.perf_counter() - started, dtype, how)
        if part:
            result.settings["part"] = describe(part)
            result.item_values = values[specs[0]["task"]]
        return result

    def result(self, cfg: BenchmarkConfig, specs: list[dict], shots: list[dict], out: dict,
               files: dict[str, str], seconds: float, dtype=None, how: dict | None = None) -> BenchmarkResult:
        """The BenchmarkResult of one lm-eval run: score, records, settings, provenance, key; `how`: the
        model's arrangement (provenance.arrangement)."""
        from tasks.benchmarks.provenance import comparability, provenance

        names = [s["task"] for s in specs]
        primary = self.metric_for(cfg)
        metric, filt = (primary.split(",") + [""])[:2]
        records, metrics = [], {}
        for spec in specs:
            task = spec["task"]
            subset = task.removeprefix(f"smolflow_{self.name}_") if self.subsets else None
            names_logged = [m["metric"] for m in out["configs"][task].get("metric_list") or []] or ["acc", "acc_norm"]
            records += self.records(out["samples"][task], primary, names_logged, subset)
            for k, v in out["results"][task].items():
                if isinstance(v, (int, float)) and "," in k:
                    metrics[f"{subset}/{k}" if len(specs) > 1 else k] = float(v)
        if len(specs) == 1:
            score = out["results"][names[0]].get(primary, 0.0)  # absent: an item shard with no items
            stderr = out["results"][names[0]].get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
        else:  # micro-average over every item of every subset, as lm-eval's weight_by_size groups do
            score = sum(r["correct"] for r in records) / len(records)
            stderr = stderr_of_mean([float(r["correct"]) for r in records])
        config = out["configs"][names[0]]
        files_used = (specs[0].get("dataset_kwargs") or {}).get("data_files")
        subsets = [n.removeprefix(f"smolflow_{self.name}_") for n in names] if self.subsets else None
        # Items the limit left out, from lm-eval's own count of each task's items (an item shard's
        # `restrict` changes only the effective count): a limit at or above the items scores every
        # one, as no limit does, and was recorded as "a subset of the items (limit)".
        counts = out.get("n-samples") or {}
        left_out = 0 if cfg.limit is None else sum(
            max(0, (counts.get(t) or {}).get("original", cfg.limit + 1) - cfg.limit) for t in names)
        settings = {
            "engine": "lm-eval " + __import__("lm_eval").__version__,
            "stock_task": self.stock_for(cfg),
            "format": self.variant(cfg) if self.name == "mmlu" else None,
            "variant": self.variant(cfg) if self.name == "bbh" else None,
            "subsets": subsets,
            "num_fewshot": config.get("num_fewshot"),
            "fewshot": shots[0] if len(shots) == 1 else dict(zip(subsets or names, shots)),
            "fewshot_seed": out.get("config", {}).get("fewshot_seed"),
            "apply_chat_template": self.apply_chat_template,
            "output_type": config.get("output_type"),
            "generation_kwargs": config.get("generation_kwargs"),
            "answer_extraction": config.get("filter_list") or self.extraction,
            "limit": f"{cfg.limit} per subset" if self.subsets and cfg.limit else cfg.limit,
            "left_out_by_limit": left_out,
            "data": files_used or f"{self.hub[0]} ({self.hub[1]})",
            "reference": self.reference,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,  # moves scores: in the key
        } | (how or {})
        full = left_out == 0 and (not self.subsets or cfg.subsets is None)
        prov = provenance(self.name, self.hub, cfg.data, self.source_files(cfg), self.is_reference(cfg, config), full)
        key, parts = comparability(self.name, prov, records, settings, primary)
        return BenchmarkResult(
            name=self.name,
            score=float(score),
            stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
            n=len(records),
            metric=primary,
            settings=settings | {"provenance": prov["note"]},
            metrics=metrics,
            records=records,
            seconds=seconds,
            provenance=prov,
            comparability_key=key,
            comparability=parts,
            lm_eval_files=files,
        )

    def source_files(self, cfg: BenchmarkConfig) -> dict[str, str] | None:
        """The user's (or fixture's) files the items were read from; None for the hub."""
        return self.data_files(cfg)

    def is_reference(self, cfg: BenchmarkConfig, config: dict[str, Any]) -> bool:
        """Whether these settings are the published figure's (n-shot, format, variant)."""
        return self.variant(cfg) in (None, "cloze", "answer_only") and config.get("num_fewshot") == self.reference_shots

    reference_shots: int = 0
    extraction: str = "lm-eval stock task's (see stock_task)"
