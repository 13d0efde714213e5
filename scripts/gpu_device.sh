#!/usr/bin/env bash
# On the device machine (the `device` tool's run), with one part of scripts/gpu_kit.py's kit carried:
# stash that part on the machine; once every part is there, install the kit into /tmp/site (first on
# PYTHONPATH, ahead of the image's own packages) and run scripts/gpu_run.py with this script's arguments, its JSON
# and log written to $OUT. Offline: the built-in SmolLM2-135M-Instruct and the shipped fixtures.
# GPU_SCRIPT=scripts/bench_eval.py (any script of this repo) runs that one instead, with the kit
# installed once per machine: e.g. after gpu_run.py in the same call, or in a later call while warm.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stash=${SMOLFLOW_KIT_STASH:-/tmp/smolflow-kit}  # outlives the call while the machine stays warm
site=${SMOLFLOW_KIT_SITE:-/tmp/site}
work=${SMOLFLOW_KIT_WORK:-/tmp/gpu-run}  # gpu_run.py writes its tuned model beside its JSON: not into $OUT
mkdir -p "$stash"
shopt -s nullglob
for part in .kit/part-*/; do cp "$part"* "$stash"/; done
manifest=$stash/kit.txt
[ -f "$manifest" ] || { echo "gpu_device.sh: no kit part carried: run scripts/gpu_kit.py here, then carry .kit/part-1" >&2; exit 2; }
missing=0
while read -r name; do [ -f "$stash/$name" ] || missing=$((missing + 1)); done < "$manifest"
if [ "$missing" -gt 0 ]; then
  echo "gpu_device.sh: part stashed; $missing of the kit's $(wc -l < "$manifest") files still to come: carry the next part now (the machine stays warm ~30 s)"
  exit 0
fi
if [ ! -f "$site/.smolflow-kit" ]; then  # once per machine: a later GPU_SCRIPT run finds it installed
  for first in "$stash"/*.piece-00; do
    whole=${first%.piece-00}
    cat "$whole".piece-* > "$whole"
  done
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$stash"/*.whl
  cp "$manifest" "$site/.smolflow-kit"
fi
script=${GPU_SCRIPT:-scripts/gpu_run.py}
name=$(basename "$script" .py)
[ "$name" = gpu_run ] && set -- --out "$work/gpu_run.json" "$@"
export PYTHONPATH=$site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  SMOLFLOW_CACHE=${SMOLFLOW_CACHE:-/tmp/smolflow-cache} PREFECT_HOME=${PREFECT_HOME:-/tmp/prefect} \
  WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
out=${OUT:-$work}
mkdir -p "$work" "$out"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PYTHON" -c 'import torch, transformers, trl, lm_eval; print("torch", torch.__version__, "cuda", torch.version.cuda,
"| transformers", transformers.__version__, "| trl", trl.__version__, "| lm_eval", lm_eval.__version__)'
  "$PYTHON" "$script" "$@"; } 2>&1 | tee "$out/$name.log"
if [ -f "$work/gpu_run.json" ] && [ "$out" != "$work" ]; then cp "$work/gpu_run.json" "$out/"; fi
