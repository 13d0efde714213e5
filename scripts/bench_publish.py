"""Publishing a cached model into a new run folder: copy (before) vs hard link (now), side by side.

    .venv/bin/python scripts/bench_publish.py            # the real SmolLM2-135M (~517 MB), 2 repeats

A cached re-run (issue 16) used to copy the tuned model from the earlier run's folder into the new
one (`ArtifactStore.upload_dir`); now `tasks.transfer.place_dir` hard-links it. Prints seconds and
new disk blocks for each, measured in the same process on the same files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.soak import disk_bytes  # noqa: E402
from tasks.storage import ArtifactStore  # noqa: E402
from tasks.transfer import place_dir  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the converted built-in SmolLM2-135M)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if args.model is None:
        from tasks.models import convert_builtin

        args.model = str(convert_builtin())
    work = Path(tempfile.mkdtemp(prefix="smolflow-publish-"))
    try:
        source = ArtifactStore(str(work / "runs" / "first")).upload_dir(Path(args.model), "model")
        base = disk_bytes(work)
        print(f"model: {args.model} ({base / 1e6:.0f} MB)\n")
        print("| method | seconds | new disk MB |\n|---|---|---|")
        results = {}
        for i in range(args.repeats):
            for name, publish in (("copy (before: upload_dir)",
                                   lambda run: ArtifactStore(run).upload_dir(Path(source), "model")),
                                  ("hard link (now: place_dir)",
                                   lambda run: place_dir(source, ArtifactStore(run), "model"))):
                run = str(work / "runs" / f"{name[:4]}-{i}")
                before = disk_bytes(work)
                started = time.perf_counter()
                publish(run)
                seconds = time.perf_counter() - started
                grown = disk_bytes(work) - before
                results.setdefault(name, []).append(seconds)
                print(f"| {name} | {seconds:.3f} | {grown / 1e6:.1f} |", flush=True)
        copy, link = (min(v) for v in results.values())
        print(f"\nbest of {args.repeats}: copy {copy:.3f} s, link {link:.3f} s: {copy / max(link, 1e-6):.0f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
