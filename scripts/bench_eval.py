"""Evaluation speed: smolflow's shared-prefix engine against lm-eval's HF backend, side by side.

    python scripts/bench_eval.py [--items 8] [--threads 1] [--cases gsm8k-5shot mmlu-cloze-0shot ...]

Runs the real SmolLM2-135M-Instruct through the stock lm-eval tasks twice per case, once with
lm-eval's `HFLM` and once with `SharedPrefixLM` (tasks/benchmarks/fast_lm.py), in this one
process, and prints per-item seconds (CPU seconds of this process, and wall seconds: on a shared
machine the CPU figure is the one to compare), the speed-up, how many items agree, and the seed's
whole suite extrapolated from the per-item rates.

Data (offline): GSM8K and MATH from the shipped fixtures; MMLU from the real MMLU dev questions
that lm-eval's `mmlu/flan_cot_fewshot` YAMLs embed (5 per subject; a subject's 5-shot examples are
the next subject's questions); BBH from the real examples the `bbh/fewshot` YAMLs embed (3 per task).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CASES = {  # label: (benchmark, lettered MMLU, n-shot)
    "gsm8k-5shot": ("gsm8k", False, 5),
    "mmlu-cloze-0shot": ("mmlu", False, 0),
    "mmlu-cloze-5shot": ("mmlu", False, 5),
    "mmlu-letter-0shot": ("mmlu", True, 0),
    "mmlu-letter-5shot": ("mmlu", True, 5),
    "bbh-3shot": ("bbh", False, 3),
    "math-4shot": ("math", False, 4),
}
# The seed's suite on one model: items per benchmark, and the case that stands for it.
SUITE = {"mmlu-cloze-0shot": 14042, "gsm8k-5shot": 1319, "math-4shot": 500, "bbh-3shot": 6511}
HUMANEVAL = (164, 1.3)  # items, s/item measured in issue 16 (smolflow's own generate path, not lm-eval)


def mmlu_rows() -> dict[str, list[dict]]:
    """Real MMLU dev questions per subject, parsed from lm-eval's flan CoT few-shot YAMLs."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "flan_cot_fewshot"
    out = {}
    for path in sorted(folder.glob("mmlu_*.yaml")):
        spec = load_yaml(path)
        rows = []
        for sample in spec["fewshot_config"]["samples"]:
            stem, *rest = re.split(r"\s*\(([A-D])\)\s*", sample["question"])
            answer = re.search(r"answer is \(([A-D])\)", sample["target"])
            if len(rest) == 8 and answer and "".join(rest[0::2]) == "ABCD":
                rows.append({"question": stem.strip(), "subject": spec["dataset_name"],
                             "choices": [c.strip() for c in rest[1::2]], "answer": "ABCD".index(answer[1])})
        if len(rows) == 5:
            out[spec["dataset_name"]] = rows
    return out


def build_data(root: Path, items: int) -> dict[str, tuple[str, list[str] | None, int]]:
    """Local data per benchmark: (data path, subsets, limit per subset)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    subjects = mmlu_rows()
    names = sorted(subjects)[: math.ceil(items / 5)]
    (root / "mmlu").mkdir()
    test = [r for s in names for r in subjects[s]]
    dev = [r | {"subject": s} for i, s in enumerate(names) for r in subjects[sorted(subjects)[(i + 1) % len(subjects)]]]
    (root / "mmlu" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (root / "mmlu" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    bbh = Path(lm_eval.__file__).parent / "tasks" / "bbh" / "fewshot"
    tasks = sorted(p.stem for p in bbh.glob("*.yaml") if not p.stem.startswith("_"))[: math.ceil(items / 3)]
    (root / "bbh").mkdir()
    for task in tasks:
        samples = load_yaml(bbh / f"{task}.yaml")["fewshot_config"]["samples"]
        (root / "bbh" / f"{task}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return {
        "mmlu": (str(root / "mmlu"), names, 5),
        "bbh": (str(root / "bbh"), tasks, 3),
        "gsm8k": ("fixture", None, items),
        "math": ("fixture", None, items),
    }


def agreement(hf, fast) -> tuple[int, float]:
    """Items with identical output (multiple choice: the same pick) and the largest log-likelihood gap."""
    same, gap = 0, 0.0
    for a, b in zip(hf.records, fast.records, strict=True):
        if isinstance(a["output"], dict):
            same += a["extracted"] == b["extracted"]
            gap = max([gap] + [abs(a["output"][k] - b["output"][k]) for k in a["output"]])
        else:
            same += a["output"] == b["output"]
    return same, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=8, help="items per benchmark (MMLU: rounded up to 5 per subject, BBH: 3 per task)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from tasks.benchmarks import REGISTRY
    from tasks.benchmarks.fast_lm import SharedPrefixLM
    from tasks.benchmarks.mmlu import MMLU
    from tasks.config import BenchmarkConfig
    from tasks.models import convert_builtin, load_model, resolve_model

    class FewShotMMLU(MMLU):  # MMLU's configs pin num_fewshot: 0, so lm-eval would ignore the shots
        def task_configs(self, cfg, workdir):
            return [spec | {"num_fewshot": cfg.num_fewshot or 0} for spec in super().task_configs(cfg, workdir)]

    class LetteredMMLU(FewShotMMLU):  # lm-eval's stock mmlu/default: "A. ... D." choices, scored " A".." D"
        stock_yaml = "mmlu/default/mmlu_{subset}.yaml"
        metric = "acc,none"

    torch.set_num_threads(args.threads)
    convert_builtin()
    model, tokenizer = load_model(resolve_model.fn("builtin:smollm2-135m-instruct"))
    model = model.to(getattr(torch, args.dtype)).eval()
    print(f"SmolLM2-135M-Instruct {args.dtype}, {args.threads} torch thread(s), batch size {args.batch_size}, "
          f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")
    rows, rates = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(Path(tmp), args.items)
        for label in args.cases:
            name, lettered, shots = CASES[label]
            source, subsets, limit = data[name]
            bench = LetteredMMLU() if lettered else FewShotMMLU() if name == "mmlu" else REGISTRY[name]
            cfg = BenchmarkConfig(name=name, limit=limit, num_fewshot=shots, data=source, subsets=subsets, batch_size=args.batch_size)
            timed = {}
            for cls in (HFLM, SharedPrefixLM):
                lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=str(model.device))
                wall, cpu = time.perf_counter(), time.process_time()
                result = bench.evaluate_lm(lm, cfg)
                timed[cls] = (result, (time.process_time() - cpu) / result.n, (time.perf_counter() - wall) / result.n)
            (hf, hf_cpu, hf_wall), (fast, fast_cpu, fast_wall) = timed[HFLM], timed[SharedPrefixLM]
            same, gap = agreement(hf, fast)
            delta = sum(r["correct"] for r in fast.records) - sum(r["correct"] for r in hf.records)
            rates[label] = (hf_cpu, fast_cpu)
            rows.append(f"| {label} | {hf.n} | {hf_cpu:.2f} | {fast_cpu:.2f} | {hf_cpu / fast_cpu:.2f}x | {hf_wall:.2f} | "
                        f"{fast_wall:.2f} | {hf_wall / fast_wall:.2f}x | {same}/{hf.n} ({100 * same / hf.n:.0f}%) | "
                        f"{gap:.1e} | {delta:+d} |")
            print(rows[-1], flush=True)
    print("\n| case | items | HF CPU s/item | smolflow-hf CPU s/item | speed-up (CPU) | HF wall s/item | "
          "smolflow-hf wall s/item | speed-up (wall) | identical | max Δ loglik | Δ score (items) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if set(SUITE) <= set(rates):
        hf_total = sum(n * rates[c][0] for c, n in SUITE.items()) + HUMANEVAL[0] * HUMANEVAL[1]
        fast_total = sum(n * rates[c][1] for c, n in SUITE.items()) + HUMANEVAL[0] * HUMANEVAL[1]
        print(f"\nSeed suite on one model (MMLU cloze 0-shot {SUITE['mmlu-cloze-0shot']}, GSM8K {SUITE['gsm8k-5shot']}, "
              f"MATH-500, BBH {SUITE['bbh-3shot']}; HumanEval {HUMANEVAL[0]} at {HUMANEVAL[1]} s/item either way), "
              f"{args.threads} thread(s), CPU seconds: lm-eval HF {hf_total / 3600:.2f} h, smolflow-hf {fast_total / 3600:.2f} h "
              f"({hf_total / fast_total:.2f}x)")


if __name__ == "__main__":
    main()
