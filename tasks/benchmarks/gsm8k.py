"""GSM8K: grade-school math word problems, answer after '#### ' (openai/gsm8k, config main).

lm-eval's stock task: 5-shot "Question: ...\\nAnswer:" prompts with examples drawn from the train
split (its random sampler, seed 1234), greedy, stop at "Question:"; strict-match reads the number
after "#### ", as the dataset's gold answers write it. Data with only a test split has no examples
to draw from that are not scored items, so it runs lm-eval's `gsm8k-cot` task instead, whose fixed
8 chain-of-thought exemplars (Wei et al. 2022) ship in its YAML ("Q: ...\\nA:", answer after "The
answer is"); the settings record that (stock_task, fewshot) and the score is keyed apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import BenchmarkConfig
from tasks.benchmarks.base import LmEvalBenchmark


class GSM8K(LmEvalBenchmark):
    name = "gsm8k"
    hub = ("openai/gsm8k", "main")
    fixture = "gsm8k"
    stock_yaml = "gsm8k/gsm8k.yaml"
    fixed_yaml = "gsm8k/gsm8k-cot.yaml"  # lm-eval's GSM8K task with fixed exemplars
    metric = "exact_match,strict-match"
    reference = "lm-eval gsm8k v3 (5-shot from the train split, no chat template); SmolLM2 card GSM8K 5-shot"
    full_items = 1319
    cost_per_item = 7.0
    reference_shots = 5
    row_fields = ("question", "answer")  # the stock YAML's doc_to_text and doc_to_target

    def needs_fixed(self, cfg: BenchmarkConfig) -> bool:
        files = self.data_files(cfg)
        return files is not None and "train" not in files

    def stock_for(self, cfg: BenchmarkConfig) -> str:
        return self.fixed_yaml if self.needs_fixed(cfg) else self.stock_yaml

    def task_configs(self, cfg: BenchmarkConfig, workdir: Path) -> list[dict[str, Any]]:
        files = self.data_files(cfg)
        spec = self.stock(self.stock_for(cfg)) | {"task": "smolflow_gsm8k", "tag": []}
        if files is not None:
            spec |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}
            if "train" not in files:  # examples from the YAML's fixed set, never from the test split
                spec |= {"training_split": None, "fewshot_split": None}
        return [self.shots(spec, cfg)]

    def is_reference(self, cfg: BenchmarkConfig, config: dict[str, Any]) -> bool:
        return not self.needs_fixed(cfg) and config.get("num_fewshot") == self.reference_shots
