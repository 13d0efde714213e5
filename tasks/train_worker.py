"""Data-parallel training: `training.num_processes` ranks under torchrun, each running `fit`.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.train_worker SPEC.json

The parent (the train_sft task, `tasks.training.launch`) writes the FitSpec, starts torchrun and
reads rank 0's result.
The Trainer (through accelerate) joins the process group torchrun sets up: gloo on the CPU, NCCL
on GPUs. `accelerate launch --cpu --num_processes 2` gave a single process in one try here, so
torchrun it is, and the result records the world size that really ran.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tasks.leftovers import own_temp_root
from tasks.parent_death import die_with_parent
from tasks.training import FitSpec, fit


def main(spec_path: str) -> None:
    import torch

    die_with_parent()
    own_temp_root()  # a rank SIGKILLed with its parent leaves no temporary files for good

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank_gpu = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and rank_gpu < torch.cuda.device_count():
        # each rank's own GPU before `fit` runs anything there (its probes): else every rank would use GPU 0
        torch.cuda.set_device(rank_gpu)
    result = fit(FitSpec.model_validate_json(Path(spec_path).read_text(encoding="utf-8")))
    if int(os.environ.get("RANK", "0")) == 0:
        target = Path(os.environ["SMOLFLOW_FIT_RESULT"])
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(result), encoding="utf-8")
        tmp.rename(target)  # atomic: the parent never reads half a result


if __name__ == "__main__":
    main(sys.argv[1])
