"""Data-parallel training: `training.num_processes` ranks under torchrun, each running `fit`.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.train_worker SPEC.json

The parent (the train_sft task) writes the FitSpec, starts torchrun and reads rank 0's result.
The Trainer (through accelerate) joins the process group torchrun sets up: gloo on the CPU, NCCL
on GPUs. `accelerate launch --cpu --num_processes 2` gave a single process in one try here, so
torchrun it is, and the result records the world size that really ran.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tasks.runtime import run_logger
from tasks.training import FitSpec, fit


def die_with_parent(parent: int | None = None) -> None:
    """Linux: SIGKILL this process when its parent dies. torchrun starts each rank in a session of
    its own, so a killed run would otherwise leave ranks behind, blocked in a collective."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: no such safety net
    if parent is not None and os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def launch(spec: FitSpec) -> dict:
    """Run `fit(spec)` on spec.cfg.num_processes ranks; rank 0's metrics and log history."""
    import torch

    n = spec.cfg.num_processes
    with tempfile.TemporaryDirectory(prefix="smolflow-ddp-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(spec.model_dump_json())
        env = os.environ | {
            "SMOLFLOW_FIT_RESULT": str(result_path),
            # Each rank gets its share of the cores: oversubscribed threads made torch ~10x slower.
            "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // n)),
        }
        if spec.placement.device == "cuda":
            env.pop("OMP_NUM_THREADS")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "tasks.train_worker", str(spec_path)]
        run_logger().info("Training on %d processes: %s", n, " ".join(cmd))
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=functools.partial(die_with_parent, os.getpid()))
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"training on {n} processes failed (exit {proc.returncode}); last output:\n"
                               + proc.stdout[-4000:])
        return json.loads(result_path.read_text())


def main(spec_path: str) -> None:
    import torch

    die_with_parent()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = fit(FitSpec.model_validate_json(Path(spec_path).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        target = Path(os.environ["SMOLFLOW_FIT_RESULT"])
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.rename(target)  # atomic: the parent never reads half a result


if __name__ == "__main__":
    main(sys.argv[1])
