"""BIG-Bench Hard: 27 hard BIG-Bench tasks (lukaemon/bbh, one config per task; rows input/target).

`variant: answer_only` (default): lm-eval's stock `bbh/fewshot` tasks, 3-shot answer-only prompts
with the few-shot examples from Suzgun et al. (2022) embedded in each task's YAML, greedy, stop at
"Q" or a blank line, exact match; SmolLM2's published "BBH 3-shot" setting. `variant: cot`: lm-eval's
`bbh/cot_fewshot` (the same 3 examples with their chain of thought, "Let's think step by step.",
up to 1024 new tokens, the answer read after "the answer is": metric `exact_match,get-answer`),
the variant many leaderboards report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import BenchmarkConfig
from tasks.benchmarks.base import LmEvalBenchmark, need_strings, read_numbered


def _stock_tasks() -> tuple[str, ...]:
    import lm_eval

    folder = Path(lm_eval.__file__).parent / "tasks" / "bbh" / "fewshot"
    return tuple(sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_")))


class BBH(LmEvalBenchmark):
    name = "bbh"
    hub = ("lukaemon/bbh", "<task>")
    fixture = "bbh"
    stock_yaml = "bbh/fewshot/{subset}.yaml"
    metric = "exact_match,strip"
    reference = "SmolLM2 model card, BBH 3-shot (lighteval); lm-eval bbh/fewshot (Suzgun et al. 2022 prompts)"
    full_items = 6511
    cost_per_item = 1.6
    extraction = "the generation up to the first stop sequence, stripped of surrounding whitespace, compared exactly with the target"
    # The stock task compares the raw generation, but after "A:" models answer " True" (with the
    # leading space the few-shot examples put there), which never equals "True": every model
    # scores 0. lm-eval's own remove_whitespace filter fixes that without touching the prompt.
    strip_filter = [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}]
    subsets = _stock_tasks()
    reference_shots = 3

    def variant(self, cfg: BenchmarkConfig) -> str:
        return cfg.variant or "answer_only"

    def stock_for(self, cfg: BenchmarkConfig) -> str:
        return "bbh/cot_fewshot/{subset}.yaml" if self.variant(cfg) == "cot" else self.stock_yaml

    def metric_for(self, cfg: BenchmarkConfig) -> str:
        return "exact_match,get-answer" if self.variant(cfg) == "cot" else self.metric

    def data_files(self, cfg: BenchmarkConfig) -> dict[str, str] | None:
        """Local files: a folder with one <task>.jsonl (or .parquet) per BBH task."""
        folder = self.local_source(cfg)
        if folder is None:
            return None
        if not folder.is_dir():
            raise ValueError(f"benchmarks[bbh].data={cfg.data!r}: need a folder of <task>.jsonl files")
        files = {f.stem: str(f) for f in sorted(folder.iterdir()) if f.suffix in (".jsonl", ".json", ".parquet")}
        unknown = sorted(set(files) - set(self.subsets))
        if unknown or not files:
            raise ValueError(f"benchmarks[bbh].data={cfg.data!r}: files must be named <task>.jsonl for BBH tasks; unknown: {unknown}")
        return files

    def task_configs(self, cfg: BenchmarkConfig, workdir: Path) -> list[dict[str, Any]]:
        files = self.data_files(cfg)
        chosen = cfg.subsets or (list(files) if files is not None else list(self.subsets))
        specs = []
        for task in chosen:
            spec = self.stock(self.stock_for(cfg).format(subset=task)) | {"task": f"smolflow_bbh_{task}", "tag": []}
            if self.variant(cfg) == "answer_only":  # cot keeps its stock get-answer filter
                spec["filter_list"] = self.strip_filter
            if files is None:
                spec |= {"dataset_path": self.hub[0], "dataset_name": task}
            else:
                if task not in files:
                    raise ValueError(f"benchmarks[bbh].subsets: no {task}.jsonl in {cfg.data!r}")
                for where, row in read_numbered(files[task]):
                    need_strings(where, row, ("input", "target"))
                # The few-shot examples live in the stock YAML, so only a test split is needed.
                spec |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {"test": files[task]}}}
            specs.append(self.shots(spec, cfg))
        return specs
