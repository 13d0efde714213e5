"""Data stage at scale (a benchmark, not a test): synthetic smoltalk-shaped rows through the real pipeline.

    nice .venv/bin/python scripts/bench_data.py                  # 1,000,000 train rows (+1% test)
    nice .venv/bin/python scripts/bench_data.py --rows 200000 --num-proc 2

Writes the rows as parquet (Arrow batches, never all rows in memory) into a temporary directory,
then runs what a flow run does with them, cold and then again (everything cached): the data
stage (`load_chat_dataset`: load, check every row, save) and the tokenization stage
(`tokenized_splits`: chat template, token ids, token-length stats, save), on the built-in
SmolLM2-135M-Instruct tokenizer. Prints rows/s, peak RSS (this process plus its worker processes,
sampled, and getrusage's peaks) and the cached re-run time. Targets on the project's 2-core
machine: >= 2,000 rows/s, peak RSS < 2 GiB, cached re-run < 10 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = (
    "the of and to a in is you that it he was for on are as with his they I at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see number "
    "no way could people my than first water been call who oil its now find long down day did get come made may "
    "part over new sound take only little work know place year live me back give most very after thing our just "
    "name good sentence man think say great where help through much before line right too mean old any same tell "
    "boy follow came want show also around form three small set put end does another well large must big even such "
    "because turn here why ask went men read need land different home us move try kind hand picture again change "
    "off play spell air away animal house point page letter mother answer found study still learn should weekend "
    "garden recipe coffee weather trip museum basil plant umbrella bike train city park music movie book friend"
).split()


def _conversations(rng, words, count: int, row_id: int) -> list[list[dict]]:
    """`count` conversations; the first user turn carries a running row number, so none repeats."""
    import numpy as np

    exchanges = rng.integers(1, 4, count)
    system = rng.random(count) < 0.2
    lengths = np.clip(rng.lognormal(3.4, 0.9, int((2 * exchanges).sum())), 3, 400).astype(int)
    pool = words[rng.integers(0, len(words), int(lengths.sum()))]
    cuts = np.concatenate([[0], np.cumsum(lengths)])
    texts = iter(" ".join(pool[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    out = []
    for i in range(count):
        conversation = [{"role": "system", "content": "You are a friendly assistant."}] if system[i] else []
        for turn in range(2 * exchanges[i]):
            text = next(texts) + (f" (#{row_id + i})" if turn == 0 else "")
            conversation.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text})
        out.append(conversation)
    return out


def generate(folder: Path, rows: int, seed: int = 0, batch: int = 50_000, shard: int = 250_000) -> dict[str, int]:
    """train/test parquet files of smoltalk-shaped rows: 1-3 user/assistant exchanges (2-6 turns),
    sometimes a system turn first, turns of 3-400 words (log-normal), every row unique. Files of
    at most `shard` rows (~110 MB), as `push_to_hub` shards a dataset of this size."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    sizes = {"train": rows, "test": max(10, rows // 100)}
    row_id = 0
    for split, n in sizes.items():
        shards = range(0, n, shard)
        for k, first in enumerate(shards):
            with pq.ParquetWriter(folder / f"{split}-{k:05d}-of-{len(shards):05d}.parquet", schema) as writer:
                for lo in range(first, min(first + shard, n), batch):
                    count = min(batch, first + shard - lo, n - lo)
                    writer.write_table(pa.table({"messages": _conversations(rng, words, count, row_id)}, schema=schema))
                    row_id += count
    return sizes


def _pss_anon(pid: int) -> int:
    """PSS of a process's anonymous memory (its heap: not the pages of memory-mapped files, which
    the kernel may drop whenever it needs the memory), in bytes."""
    with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("Pss_Anon:")), 0)


class PeakRSS:
    """Samples the memory of this process plus its children (datasets' map workers) every 0.5 s:
    the sum of RSS, the sum of PSS (a page shared between processes, e.g. the libraries forked
    workers share with their parent, counted once in all rather than once per process) and of its
    anonymous part."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self.peak_pss, self.peak_anon = psutil.Process(), 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.wait(0.5):
            rss = pss = anon = 0
            for proc in (self.proc, *self.proc.children(recursive=True)):
                try:
                    info, proc_anon = proc.memory_full_info(), _pss_anon(proc.pid)
                except (psutil.Error, OSError):  # a worker that just ended
                    continue
                rss, pss, anon = rss + info.rss, pss + info.pss, anon + proc_anon
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self.peak_anon = max(self.peak_anon, anon)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_pipeline(folder: Path, model, max_length: int, num_proc: int | None):
    """(data, tokenized, [(seconds, memory) of the data stage, of tokenization])."""
    from tasks.config import DataConfig
    from tasks.data import load_chat_dataset
    from tasks.tokenization import tokenized_splits

    phases = []
    with PeakRSS() as memory:
        t = time.perf_counter()
        data = load_chat_dataset.fn(DataConfig(dataset=str(folder)))
        phases.append((time.perf_counter() - t, memory))
    with PeakRSS() as memory:
        t = time.perf_counter()
        tokenized = tokenized_splits(model, data, max_length, num_proc=num_proc)
        phases.append((time.perf_counter() - t, memory))
    return data, tokenized, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="train rows (test: 1%% more)")
    parser.add_argument("--num-proc", type=int, default=None,
                        help="worker processes for the maps (default: every core for big data)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="smolflow-bench-data-"))
    # Fresh caches, so the first pass is really cold; the converted model is shared, not rebuilt.
    os.environ.update(SMOLFLOW_CACHE=str(work / "cache"), HF_DATASETS_CACHE=str(work / "hf-datasets"),
                      HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    models = Path.home() / ".cache" / "smolflow" / "models"
    models.mkdir(parents=True, exist_ok=True)
    (work / "cache").mkdir()
    (work / "cache" / "models").symlink_to(models)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import datasets

    datasets.disable_progress_bars()
    from tasks.data import num_proc_for
    from tasks.models import BUILTIN, resolve_model

    try:
        folder = work / "data"
        folder.mkdir()
        t = time.perf_counter()
        sizes = generate(folder, args.rows)
        size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"generated {sizes} rows as parquet ({size_mb:.0f} MiB) in {time.perf_counter() - t:.0f} s")
        model = resolve_model.fn(BUILTIN)
        total = sum(sizes.values())
        print(f"num_proc: {args.num_proc or num_proc_for(args.rows)}; cores: {len(os.sched_getaffinity(0))}; "
              f"load average: {os.getloadavg()[0]:.2f}")
        data, tok, cold = run_pipeline(folder, model, args.max_length, args.num_proc)
        assert not tok.cached
        _, again, warm = run_pipeline(folder, model, args.max_length, args.num_proc)
        assert again.cached and again.path == tok.path
        self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        train = tok.stats.splits["train"]
        tokens = train.mean * train.rows
        print(f"rows checked/saved: {data.rows}; tokens per train row: mean {train.mean:.0f}, median "
              f"{train.median:.0f}, p95 {train.p95:.0f}, max {train.max}; over max_length {args.max_length}: "
              f"{tok.stats.over_max_length}")

        def row(name, seconds, memory=None):
            mem = " | ".join(f"{getattr(memory, k) / 2**30:.2f} GiB" for k in ("peak_pss", "peak_anon", "peak")) \
                if memory else " | | "
            return f"| {name} | {seconds:.1f} s | {total / seconds:,.0f} | {mem} |"

        print("\n| phase | time | rows/s | peak PSS | of it anonymous | peak RSS |\n|---|---|---|---|---|---|")
        print(row("data stage, cold (load, check, save)", *cold[0]))
        print(row(f"tokenization, cold ({tokens / cold[1][0]:,.0f} train tokens/s)", *cold[1]))
        print(row("**both, cold**", cold[0][0] + cold[1][0]))
        print(row(f"both, cached re-run (data {warm[0][0]:.1f} s, tokens {warm[1][0]:.1f} s)", warm[0][0] + warm[1][0]))
        print("\nPeak memory: sums over this process and its map workers, sampled every 0.5 s. PSS counts a page "
              "shared between processes (libraries, memory-mapped Arrow files) once in all, RSS once per process; "
              "anonymous: PSS without the pages of memory-mapped files (the kernel drops those when it needs memory).")
        print(f"getrusage peaks: this process {self_peak:.2f} GiB, largest worker {child_peak:.2f} GiB")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
