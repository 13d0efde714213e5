"""Where an lm-eval task's few-shot examples come from, and lm-eval's own output files.

Few-shot examples never come from the items being scored: from the train/dev split when the data
has one, else from the fixed examples the stock task ships (BBH's 3, Minerva MATH's 4, GSM8K
chain-of-thought's 8), else the setting is refused, naming the field. The record says which split
or set, and which examples (ids for a first-n sampler, a hash of the pool otherwise).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from tasks.benchmarks.provenance import digest, sha256_file

# lm-eval's default few-shot seed (simple_evaluate's fewshot_random_seed), used by its random sampler.
FEWSHOT_SEED = 1234


def _rows(path: str) -> list[dict]:
    from tasks.benchmarks.rows import read_rows

    return read_rows(path)


def fewshot_source(bench: str, spec: dict[str, Any], field: str = "num_fewshot") -> dict[str, Any]:
    """What the spec's few-shot examples are; ValueError naming the field when they would come from
    the evaluated items, or there are fewer than asked for."""
    k = int(spec.get("num_fewshot") or 0)
    where = f"benchmarks[{bench}].{field}={k}"
    subset = spec["task"].removeprefix(f"smolflow_{bench}").lstrip("_") or None
    label = f" ({subset})" if subset else ""
    if k == 0:
        return {"source": "none (0-shot)"}
    config = spec.get("fewshot_config") or {}
    sampler = config.get("sampler", "default")
    samples = config.get("samples")
    if samples:  # fixed examples shipped in the stock task's YAML
        if callable(samples):
            samples = samples()
        if len(samples) < k:
            raise ValueError(f"{where}: the stock task{label} ships only {len(samples)} fixed examples; use at most {len(samples)}")
        return {"source": "fixed examples shipped with the stock task", "sampler": sampler, "count": k, "ids": list(range(k)) if sampler == "first_n" else None,
                "sha256": digest(samples[:k] if sampler == "first_n" else samples)}
    split = spec.get("fewshot_split") or spec.get("training_split") or spec.get("validation_split")
    test = spec.get("test_split", "test")
    files = (spec.get("dataset_kwargs") or {}).get("data_files")
    if split is None or split == test:
        raise ValueError(
            f"{where}: the data{label} has no train/dev split and the stock task ships no fixed examples, "
            f"so the examples would be scored items; add a dev.jsonl/train.jsonl next to test.jsonl or set {field}: 0"
        )
    info = {"source": f"{split} split", "sampler": sampler,
            "seed": None if sampler == "first_n" else FEWSHOT_SEED}
    if files is None:  # the hub dataset's own split
        return info | {"ids": list(range(k)) if sampler == "first_n" else f"random per item (seed {FEWSHOT_SEED})"}
    if split not in files:
        raise ValueError(f"{where}: no {split} split for{label or ' it'} in the data; add {split}.jsonl or set {field}: 0")
    pool = _rows(files[split])
    if len(pool) < k:
        raise ValueError(f"{where}: the {split} split{label} has only {len(pool)} rows; use at most {len(pool)} or add rows")
    scored = {digest(r) for r in _rows(files[test])}
    overlap = sum(digest(r) in scored for r in pool)
    if overlap:
        raise ValueError(f"{where}: {overlap} of the {split} split's rows{label} are also test items; "
                         "few-shot examples must not be scored items: remove them from one file")
    # The pool's content hash, not its path: MMLU's per-subject pools are temporary files, and the
    # record feeds the comparability key, which must not change from one run to the next.
    return info | {"file_sha256": sha256_file(files[split]), "pool": len(pool),
                   "ids": list(range(k)) if sampler == "first_n" else f"random per item (seed {FEWSHOT_SEED})"}


def lm_eval_files(out: dict[str, Any], tracker) -> dict[str, str]:
    """lm-eval's results_<date>.json and samples_<task>_<date>.jsonl, written by its own
    EvaluationTracker exactly as `lm_eval --output_path ... --log_samples` writes them."""
    with tempfile.TemporaryDirectory() as folder:
        tracker.output_path = folder
        results = {k: copy.deepcopy(v) for k, v in out.items() if k != "samples"}
        samples = copy.deepcopy(out["samples"])  # the tracker rewrites samples as it saves them
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        files = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(folder).rglob("*.json*"))}
    if not any(n.startswith("results_") for n in files):  # the tracker logs its failures, never raises
        raise RuntimeError("lm-eval's EvaluationTracker wrote no results_*.json")
    return files


def doc_metrics(sample: dict[str, Any], names: list[str]) -> dict[str, float]:
    """lm-eval's per-document metric values as logged in its sample (acc, acc_norm, exact_match...)."""
    return {m: float(sample[m]) for m in names if isinstance(sample.get(m), (int, float, bool))}
