"""MMLU: four-choice questions in 57 subjects (cais/mmlu), in either of lm-eval's formulations.

`format: cloze` (default) scores each choice's *text* after "Question: ...\nAnswer:" and picks
the likeliest, length-normalised: lm-eval's `mmlu/continuation`, metric acc_norm; the formulation
SmolLM2's published MMLU figure uses (lighteval `mmlu_cloze`). `format: mcq` is lm-eval's default
lettered `mmlu` task ("A. ... D.", then " A".." D" scored), metric acc; it sits near chance (25%)
for models this small. Both take their few-shot examples from the dev split (first n, as lm-eval).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import BenchmarkConfig
from tasks.benchmarks.base import LmEvalBenchmark, read_numbered, write_jsonl


def _stock_subjects() -> tuple[str, ...]:
    import lm_eval

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "continuation"
    return tuple(sorted(p.stem.removeprefix("mmlu_").removesuffix("_continuation") for p in folder.glob("mmlu_*.yaml")))


class MMLU(LmEvalBenchmark):
    name = "mmlu"
    hub = ("cais/mmlu", "<subject>")
    fixture = "mmlu"
    stock_yaml = "mmlu/continuation/mmlu_{subset}.yaml"
    # acc_norm divides each choice's log-likelihood by its length in characters, so long answers are
    # not penalised for being long; lighteval's cloze numbers are length-normalised the same way.
    metric = "acc_norm,none"
    reference = "lighteval mmlu_cloze as in the SmolLM2 model card (0-shot, no chat template); lm-eval mmlu/continuation"
    full_items = 14042
    extraction = "multiple choice: the choice with the highest length-normalised log-likelihood"
    subsets = _stock_subjects()
    reference_shots = 0

    def variant(self, cfg: BenchmarkConfig) -> str:
        return cfg.format or "cloze"

    def stock_for(self, cfg: BenchmarkConfig) -> str:
        return "mmlu/default/mmlu_{subset}.yaml" if self.variant(cfg) == "mcq" else self.stock_yaml

    def metric_for(self, cfg: BenchmarkConfig) -> str:
        return "acc,none" if self.variant(cfg) == "mcq" else self.metric

    def task_configs(self, cfg: BenchmarkConfig, workdir: Path) -> list[dict[str, Any]]:
        files = self.data_files(cfg)
        local: dict[str, dict[str, list]] = {}
        if files is not None:  # one file with a `subject` column, as cais/mmlu's "all" config
            for split, path in files.items():
                for where, row in read_numbered(path):
                    subject = self.check_row(where, row)
                    local.setdefault(subject, {}).setdefault(split, []).append(row)
        chosen = cfg.subsets or (sorted(local) if files is not None else list(self.subsets))
        specs = []
        for subject in chosen:
            spec = self.stock(self.stock_for(cfg).format(subset=subject))
            spec |= {"task": f"smolflow_mmlu_{subject}", "tag": []}
            if files is not None:
                splits = local.get(subject, {})
                if "test" not in splits:
                    raise ValueError(f"benchmarks[mmlu].subsets: {subject!r} has no rows in {files['test']}")
                data = {s: write_jsonl(workdir / f"{subject}-{s}.jsonl", rows) for s, rows in splits.items()}
                spec |= self.local(data, spec)
            specs.append(self.shots(spec, cfg))
        return specs

    def check_row(self, where: str, row: dict[str, Any]) -> str:
        """The row's subject, once the row is one lm-eval can score: an answer out of range passes
        validation, then fails as an IndexError inside lm-eval after the model is loaded."""
        subject = row.get("subject")
        if subject not in self.subsets:
            raise ValueError(f"{where}: subject={subject!r} is not an MMLU subject (e.g. {self.subsets[0]!r})")
        choices, answer = row.get("choices"), row.get("answer")
        choices = choices.tolist() if hasattr(choices, "tolist") else choices  # parquet rows hold arrays
        four = isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)
        # bool is an int to Python, but True is no choice index a file means.
        if not four or isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
            raise ValueError(f"{where}: need `choices` (4 strings) and `answer` (int 0-3, the index of the "
                             f"right choice); got choices={choices!r}, answer={answer!r}")
        return subject

    def record(self, sample: dict, key: str) -> dict[str, Any]:
        # lm-eval's own choice: argmax of the log-likelihoods (acc), or of log-likelihood / length of
        # the choice's text in characters (acc_norm; api/task.py), so `extracted` agrees with `correct`.
        choices = [continuation for _, continuation in sample["arguments"]]
        lls = [resp[0] for resp in sample["filtered_resps"]]
        texts = [c.strip() for c in choices]
        norm = [float(len(c)) or 1.0 for c in sample["doc"]["choices"]] if key == "acc_norm" else [1.0] * len(choices)
        picked = max(range(len(lls)), key=lambda i: lls[i] / norm[i])
        return {
            "doc_id": sample["doc_id"],
            "prompt": sample["arguments"][0][0],
            "output": {c: round(ll, 4) for c, ll in zip(texts, lls)},  # log-likelihood per choice
            "extracted": texts[picked],
            "gold": texts[sample["target"]],
            "correct": bool(sample.get(key)),
        }
