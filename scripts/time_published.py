"""Per-item rates of the `published` profile's three benchmarks on the built-in SmolLM2-135M-Instruct,
and the full profile's expected run time on this machine from them.

    python scripts/time_published.py [--items 50] [--threads 1] [--data DIR]

Without --data the items are the shipped fixtures cycled up to --items per benchmark (real items
differ in length: MMLU and BBH prompts are longer, so real rates are somewhat slower); with --data,
DIR/mmlu, DIR/bbh, DIR/gsm8k mirrors in the hub schema. The settings are the profile's (MMLU cloze
0-shot, BBH answer-only 3-shot, GSM8K 5-shot). Scores printed here on fixtures are NOT comparable
with the published figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from tasks.config_eval import PROFILES, BenchmarkConfig  # noqa: E402
from tasks.runtime import FIXTURES  # noqa: E402

FULL = {"mmlu": 14042, "bbh": 6511, "gsm8k": 1319}  # test items of cais/mmlu, BBH's 27 tasks, openai/gsm8k
PUBLISHED = {"mmlu": 29.3, "bbh": 28.2, "gsm8k": 1.4}  # SmolLM2-135M-Instruct model card


def cycled(src: Path, dst: Path, n: int) -> None:
    """Copy src's JSONL rows to dst, repeated until there are n (the other files copied as they are)."""
    rows = [line for line in src.read_text(encoding="utf-8").split("\n") if line.strip()]
    dst.write_text("".join(r + "\n" for r in itertools.islice(itertools.cycle(rows), n)), encoding="utf-8")


def fixture_mirror(root: Path, items: int) -> Path:
    (root / "mmlu").mkdir(parents=True)
    cycled(FIXTURES / "mmlu" / "test.jsonl", root / "mmlu" / "test.jsonl", items)
    shutil.copy(FIXTURES / "mmlu" / "dev.jsonl", root / "mmlu" / "dev.jsonl")
    (root / "bbh").mkdir()
    tasks = sorted((FIXTURES / "bbh").glob("*.jsonl"))
    for f in tasks:
        cycled(f, root / "bbh" / f.name, -(-items // len(tasks)))
    (root / "gsm8k").mkdir()
    cycled(FIXTURES / "gsm8k" / "test.jsonl", root / "gsm8k" / "test.jsonl", items)
    shutil.copy(FIXTURES / "gsm8k" / "train.jsonl", root / "gsm8k" / "train.jsonl")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=50, help="items per benchmark (at least 50 for the docs' table)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", help="folder with mmlu/, bbh/, gsm8k/ mirrors (default: the fixtures, cycled)")
    args = parser.parse_args()

    import torch

    from tasks.benchmarks import REGISTRY
    from tasks.models import convert_builtin, load_model, resolve_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(resolve_model.fn(str(convert_builtin())))
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else fixture_mirror(Path(tmp), args.items)
        total, rows = 0.0, []
        for spec in PROFILES["published"]:
            name = spec["name"]
            cfg = BenchmarkConfig(**(spec | {"data": str(root / name), "batch_size": args.batch_size}))
            if name == "bbh" or (name == "mmlu" and not args.data):
                cfg.limit = None  # every row of the (cycled) files
            else:
                cfg.limit = args.items
            started = time.perf_counter()
            result = REGISTRY[name].evaluate(model, tokenizer, cfg)
            rate = (time.perf_counter() - started) / result.n
            total += rate * FULL[name]
            rows.append({"benchmark": name, "n": result.n, "s_per_item": round(rate, 3),
                         "full_items": FULL[name], "full_hours": round(rate * FULL[name] / 3600, 2),
                         "score": round(100 * result.score, 1), "published": PUBLISHED[name],
                         "provenance": result.provenance.get("note"), "num_fewshot": result.settings["num_fewshot"]})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"threads": args.threads, "load_avg": os.getloadavg(), "full_profile_hours": round(total / 3600, 1)}))


if __name__ == "__main__":
    main()
