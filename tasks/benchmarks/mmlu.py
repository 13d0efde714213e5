"""MMLU: four-choice questions in 57 subjects (cais/mmlu), scored in the cloze formulation.

Cloze ("Question: ...\\nAnswer:" followed by each choice's *text*, pick the likeliest) is the
formulation SmolLM2's published MMLU figure uses (lighteval `mmlu_cloze`); lm-eval's version of
it is the stock `mmlu/continuation` task. The letter formulation (`mmlu/default`, "A. ... D.")
sits near chance (25%) for models this small, which says little about them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import BenchmarkConfig
from tasks.benchmarks.base import LmEvalBenchmark, read_rows, write_jsonl


def _stock_subjects() -> tuple[str, ...]:
    import lm_eval

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "continuation"
    return tuple(sorted(p.stem.removeprefix("mmlu_").removesuffix("_continuation") for p in folder.glob("mmlu_*.yaml")))


class MMLU(LmEvalBenchmark):
    name = "mmlu"
    hub = ("cais/mmlu", "<subject>")
    fixture = "mmlu"
    stock_yaml = "mmlu/continuation/mmlu_{subset}.yaml"
    # acc_norm divides each choice's log-likelihood by its length in bytes, so long answers are
    # not penalised for being long; lighteval's cloze numbers are length-normalised the same way.
    metric = "acc_norm,none"
    reference = "lighteval mmlu_cloze as in the SmolLM2 model card (0-shot, no chat template); lm-eval mmlu/continuation"
    extraction = "multiple choice: the choice with the highest length-normalised log-likelihood"
    subsets = _stock_subjects()

    def task_configs(self, cfg: BenchmarkConfig, workdir: Path) -> list[dict[str, Any]]:
        files = self.data_files(cfg)
        local: dict[str, dict[str, list]] = {}
        if files is not None:  # one file with a `subject` column, as cais/mmlu's "all" config
            for split, path in files.items():
                for i, row in enumerate(read_rows(path)):
                    subject = row.get("subject")
                    if subject not in self.subsets:
                        raise ValueError(
                            f"{path} row {i}: subject={subject!r} is not an MMLU subject (e.g. {self.subsets[0]!r})"
                        )
                    if not isinstance(row.get("answer"), int) or len(row.get("choices") or []) != 4:
                        raise ValueError(f"{path} row {i}: need `choices` (4 strings) and `answer` (int 0-3)")
                    local.setdefault(subject, {}).setdefault(split, []).append(row)
        chosen = cfg.subsets or (sorted(local) if files is not None else list(self.subsets))
        specs = []
        for subject in chosen:
            spec = self.stock(self.stock_yaml.format(subset=subject))
            spec |= {"task": f"smolflow_mmlu_{subject}", "tag": [], "num_fewshot": 0}
            if files is not None:
                splits = local.get(subject, {})
                if "test" not in splits:
                    raise ValueError(f"benchmarks[mmlu].subsets: {subject!r} has no rows in {files['test']}")
                data = {s: write_jsonl(workdir / f"{subject}-{s}.jsonl", rows) for s, rows in splits.items()}
                spec |= self.local(data, spec)
            specs.append(spec)
        return specs

    def record(self, sample: dict, key: str) -> dict[str, Any]:
        choices = [continuation for _, continuation in (a for a in sample["arguments"])]
        lengths = [len(c.encode()) for c in choices]
        lls = [resp[0] for resp in sample["filtered_resps"]]
        picked = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
        return {
            "doc_id": sample["doc_id"],
            "prompt": sample["arguments"][0][0],
            "output": {c.strip(): round(ll, 4) for c, ll in zip(choices, lls)},  # log-likelihood per choice
            "extracted": choices[picked].strip(),
            "gold": choices[sample["target"]].strip(),
            "correct": bool(sample.get(key)),
        }
