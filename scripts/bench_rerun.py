"""A cached re-run against the first run, side by side: `smolflow run` three times, same settings.

    .venv/bin/python scripts/bench_rerun.py                    # the embedded defaults (real SmolLM2)
    .venv/bin/python scripts/bench_rerun.py -- --training.max-steps 10
    .venv/bin/python scripts/bench_rerun.py --baseline /tmp/before   # also another checkout's code

With --baseline DIR (e.g. `git worktree add /tmp/before HEAD~1`), that checkout's code runs the
same command too, its own first run and its joined re-runs taking turns with this checkout's, so
a change to the re-run is measured against the code before it in one command.

1. first run, nothing cached, no Prefect server (the flow starts a temporary one, as `make run` does);
2. the same command again: every computing task is answered from Prefect's cache;
3. the same command again while a Prefect server runs here (`smolflow serve`'s, port 4200 unless
   SMOLFLOW_LOCAL_SERVER says otherwise): `smolflow run` reports to it instead of starting one.
   Each timed once the server has settled (idle, as a long-running one is between runs).

The cached re-runs run --repeat times each (default 3); the table shows the median and each run.

Each run is a fresh `smolflow` process with the wall clock around it, all three in this one command
on the same machine, in a throwaway artifact root, Prefect home and smolflow cache (the built-in
model's one-time conversion is shared with ~/.cache/smolflow, so it is not part of the first run).
Prints wall seconds and each run's share of the first run's. Not a test: the
table goes to docs/performance.md. Target (issue 16): a cached re-run within 5% of the first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLFLOW = Path(sys.executable).parent / "smolflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by the live processes of a process group (from /proc)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def settle(pgid: int, timeout: float = 120) -> None:
    """Wait until the server's processes use under 5% of a core over 3 s: its start-up work
    (database set-up, first loop of each background service) is done, as on a server that has been
    running for a while."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = group_cpu(pgid)
        time.sleep(3)
        if group_cpu(pgid) - before < 0.15:
            return
    sys.exit("the Prefect server did not settle")


def timed_run(env: dict, args: list[str], log: Path, tree: Path = ROOT) -> float:
    """Wall seconds of one `smolflow run` with the code of checkout `tree` (the same virtualenv)."""
    if tree != ROOT:  # ahead of the editable install's finder, which points at this checkout
        env = env | {"PYTHONPATH": str(tree)}
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.run([str(SMOLFLOW), "run", *args], env=env, cwd=tree, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"smolflow run failed ({proc.returncode}); see {log}:\n{log.read_text(encoding='utf-8')[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", nargs="*", help="settings passed to `smolflow run` (after --)")
    ap.add_argument("--repeat", type=int, default=3, help="cached re-runs of each kind (median shown)")
    ap.add_argument("--baseline", type=Path, help="another checkout of smolflow to measure side by side")
    args = ap.parse_args()
    baseline = args.baseline.resolve() if args.baseline else None
    sys.path.insert(0, str(ROOT))
    from tasks.models import convert_builtin

    convert_builtin()  # once per machine; not part of any timed run
    work = Path(tempfile.mkdtemp(prefix="smolflow-rerun-"))
    (work / "cache").mkdir()
    (work / "cache" / "models").symlink_to(Path.home() / ".cache" / "smolflow" / "models")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(work / "prefect"), "SMOLFLOW_CACHE": str(work / "cache"),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(work),
        "SMOLFLOW_LOCAL_SERVER": f"http://127.0.0.1:{port}/api",
    }
    settings = ["--output.artifacts-uri", str(work / "runs"), *args.settings]
    server = None
    load = os.getloadavg()[0]
    try:
        rows = []
        first = timed_run(env, settings, work / "first.log")
        rows.append(("first run (nothing cached, temporary Prefect server)", [first]))
        if baseline:  # its own first run: its task code differs, so it has no cached results of ours
            base_first = timed_run(env, settings, work / "base-first.log", baseline)
        again = [timed_run(env, settings, work / f"again{i}.log") for i in range(args.repeat)]
        rows.append(("same command again (cached, temporary Prefect server)", again))
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("the Prefect server did not start")
                time.sleep(1)
        joined, base_joined = [], []
        for i in range(args.repeat):  # taking turns, so a change in the machine's speed hits both
            settle(server.pid)
            joined.append(timed_run(env, settings, work / f"joined{i}.log"))
            if baseline:
                settle(server.pid)
                base_joined.append(timed_run(env, settings, work / f"base-joined{i}.log", baseline))
        rows.append(("same command again (cached, joins the running server)", joined))
        print(f"`smolflow run {' '.join(args.settings)}` ({os.cpu_count()} CPUs, load average at start "
              f"{load:.1f})\n")
        print("| run | wall s (median) | of the first run | runs (wall s) |\n|---|---|---|---|")
        for label, times in rows:
            median = statistics.median(times)
            print(f"| {label} | {median:.1f} | {100 * median / first:.1f}% | {', '.join(f'{t:.1f}' for t in times)} |")
        if baseline:
            print(f"\nbaseline {baseline}: first run {base_first:.1f} s, joined re-runs "
                  f"{', '.join(f'{t:.1f}' for t in base_joined)} (median {statistics.median(base_joined):.1f} s, "
                  f"{100 * statistics.median(base_joined) / base_first:.1f}% of its first run); this checkout's "
                  f"joined re-run is {statistics.median(base_joined) / statistics.median(joined):.2f}x faster")
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
