"""Benchmarks one after another vs fanned out on Ray, side by side: `smolflow eval` twice.

    .venv/bin/python scripts/bench_ray.py [--items 20] [--item-shards 2]

Scores the built-in SmolLM2-135M-Instruct on MMLU (cloze, real dev questions), BBH (real
examples), GSM8K and MATH (fixtures repeated; data as in scripts/bench_eval.py) with the same
settings twice, each in a fresh `smolflow eval` process with a fresh Prefect home and cache (so
nothing is answered from a cache): once with `execution.task_runner: local` (the default: one
benchmark after another, all torch threads) and once with `ray` (a local Ray cluster on this
machine's cores, MMLU subjects and BBH tasks in shards, one torch thread per task), and with
`--item-shards N` a third time on Ray with GSM8K and MATH also split into N item shards (and with
`--one-thread` locally on one torch thread: what one task gains from the other cores). Prints
the wall time of each, how many items' answers equal the local run's, and the largest difference
of a multiple-choice log-likelihood. Those differ in the last recorded digit (1e-4) on some items:
a shard packs other items into a batch than the whole run does, and in fp32 a matmul of another
shape rounds differently (as lm-eval's HF backend does at another batch size); tests/test_ray.py
checks exact equality where the batches are the same. Not a test: the table goes to
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOLFLOW = Path(sys.executable).parent / "smolflow"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=20, help="items per benchmark")
    ap.add_argument("--shard-size", type=int, default=2, help="MMLU subjects / BBH tasks per Ray task")
    ap.add_argument("--item-shards", type=int, default=0, help="also run on Ray with GSM8K/MATH in this many item shards")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="execution.precision of every run")
    ap.add_argument("--one-thread", action="store_true",
                    help="also run locally on 1 torch thread: how far one task already scales over the cores, "
                         "i.e. what Ray can add at most")
    args = ap.parse_args()
    from scripts.bench_eval import build_data
    from tasks.benchmarks.provenance import why_not_comparable
    from tasks.models import convert_builtin

    convert_builtin()
    work = Path(tempfile.mkdtemp(prefix="smolflow-ray-"))
    try:
        data = build_data(work, args.items)
        benchmarks = [{"name": name, "data": data[name][0], "subsets": data[name][1], "limit": data[name][2]}
                      for name in ("mmlu", "bbh", "gsm8k", "math")]
        rows, records, keys = [], {}, {}
        ray = ["--execution.task-runner", "ray", "--execution.shard-size", str(args.shard_size), "--torch-threads", "1"]
        runs = {"local": [], "ray": ray}
        if args.one_thread:  # local at 2 threads vs 1: the cores one task leaves idle are Ray's whole gain
            runs = {"local": [], "local, 1 thread": ["--torch-threads", "1"], "ray": ray}
        if args.item_shards:
            runs[f"ray, item_shards {args.item_shards}"] = ray + ["--execution.item-shards", str(args.item_shards)]
        for n, (runner, extra) in enumerate(runs.items()):
            home = work / f"run{n}"
            (home / "cache").mkdir(parents=True)
            (home / "cache" / "models").symlink_to(Path.home() / ".cache" / "smolflow" / "models")
            env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
                "PREFECT_HOME": str(home / "prefect"), "SMOLFLOW_CACHE": str(home / "cache"),
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SMOLFLOW_LOCAL_SERVER": "http://127.0.0.1:9/api"}
            start = time.perf_counter()
            proc = subprocess.run(
                [str(SMOLFLOW), "eval", "--model", "builtin:smollm2-135m-instruct", "--benchmarks", json.dumps(benchmarks),
                 "--judge.enabled", "false", "--wandb.mode", "disabled", "--output.artifacts-uri", str(home / "runs"),
                 "--output.run-id", f"run{n}", "--execution.precision", args.precision, *extra],
                env=env, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"{runner}: smolflow eval failed:\n{proc.stderr[-3000:]}")
            out = home / "runs" / "runs" / f"run{n}" / "benchmarks"
            records[runner] = {b["name"]: [json.loads(line) for line in
                                           (out / b["name"] / "model.jsonl").read_text().splitlines()]
                               for b in benchmarks}
            keys[runner] = {b["name"]: json.loads((out / b["name"] / "model.summary.json").read_text())["comparability"]
                            for b in benchmarks}
            rows.append((runner, wall))
        same = {runner: {name: alike(records["local"][name], runs_records[name]) for name in records["local"]}
                for runner, runs_records in records.items() if runner != "local"}
        items = {name: len(records["local"][name]) for name in records["local"]}
        print(f"SmolLM2-135M-Instruct, {os.cpu_count()} CPUs, items per benchmark: {items}\n")
        print("| execution.task_runner | wall s | vs local |\n|---|---|---|")
        for runner, wall in rows:
            print(f"| {runner} | {wall:.1f} | {rows[0][1] / wall:.2f}x |")
        for runner, agree in same.items():
            print(f"\n{runner}: items alike with local: {agree}")
            # In reduced precision the arrangement is part of the key (tasks/benchmarks/provenance.py).
            print(f"{runner}: comparable with local (same key): "
                  f"{ {name: why_not_comparable(keys['local'][name], keys[runner][name]) if keys[runner][name] != keys['local'][name] else 'yes' for name in keys['local']} }")
        print(f"torch threads: local {os.cpu_count()} on one task at a time, ray 1 per task; precision: {args.precision}")
        walls = dict(rows)
        if "local, 1 thread" in walls:  # Ray runs one-thread tasks side by side: at most cores x one thread's speed
            scaling = walls["local, 1 thread"] / walls["local"]
            print(f"one task on {os.cpu_count()} threads runs {scaling:.2f}x its speed on 1: the most Ray can gain "
                  f"over the local run on this machine is {os.cpu_count() / scaling:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def alike(local: list[dict], other: list[dict]) -> str:
    """'50/50' items alike (generated text, or a multiple-choice pick), with the largest
    log-likelihood difference where there are log-likelihoods."""
    assert [(r.get("subset"), r["doc_id"]) for r in local] == [(r.get("subset"), r["doc_id"]) for r in other]
    from scripts.bench_eval import agreement

    same, gap = agreement(local, other)
    return f"{same}/{len(local)}" + (f", log-likelihoods within {gap:.0e}" if isinstance(local[0]["output"], dict) else "")


if __name__ == "__main__":
    main()
