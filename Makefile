# Two commands from a fresh clone: `make run` (the pipeline) and `make test` (the suite).
# Both create .venv and install the pinned dependencies once; later calls reuse them.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
WEB_LOCK  := src/rnnflow/shipping/web/package-lock.json
WEB_STAMP := .web/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Python writes the bytecode of what it imports even where the environment says not to
# (PYTHONDONTWRITEBYTECODE, common in container images): uv installs no .pyc files, and
# without them every process compiles torch, MLflow and DVC from source again (measured:
# pipeline failure tests 63 s without bytecode, 48 s writing it, 27 s with it).
unexport PYTHONDONTWRITEBYTECODE

# The installer: uv (pinned), kept outside the venv so that `uv pip sync` leaves exactly the
# lock in it. The lock's torch==2.13.0 comes from a local wheel folder when the machine has
# one (pip's PIP_FIND_LINKS, e.g. /opt/wheels), else from PyPI.
UV_VERSION := 0.13.9
UV         := $(VENV)/tools/bin/uv
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)

# The variables the README shows are checked before use: a bad value stops make with one line
# (`Makefile:N: *** NAME=VALUE: expected ...  Stop.`, exit 2) instead of reaching a program.
# $(call checked,NAME,AWK-CONDITION-ON-v,WHAT) is $(NAME) when the condition holds.
checked = $(if $(and $(if $(findstring ',$($(1))),,ok),$(shell awk -v v='$($(1))' \
  'BEGIN { exit !($(2)) }' && echo ok)),$($(1)),$(error $(1)=$($(1)): expected $(3)))
port_ok  = v ~ /^[0-9]+$$/ && v + 0 >= 1 && v + 0 <= 65535
count_ok = v ~ /^[0-9]+$$/ && v + 0 >= 1 && v + 0 <= 64
secs_ok  = v ~ /^[0-9]+([.][0-9]+)?$$/ && v + 0 > 0 && v + 0 <= 3600

.PHONY: install system-deps run test test-fast lint format bench bench-ddp profile gpu-check demo web search docs ui server server-stop serve loadtest longrange clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install --quiet --disable-pip-version-check \
	  --target $(VENV)/tools uv==$(UV_VERSION)
	$(UV) pip sync --quiet --python $(PY) requirements.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	$(PY) -m rnnflow.tools.envcheck
	touch $(STAMP)

# Debian packages the tests need, installed when missing (we run as root): PostgreSQL for
# `make server` and the tracking-server tests (it then runs as the postgres user), Chromium
# for the headless-browser check of the MLflow UI.
system-deps:
	@missing=""; \
	if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && ! command -v pg_ctl >/dev/null; then \
	  missing="postgresql"; fi; \
	if ! command -v chromium >/dev/null; then missing="$$missing chromium"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "make: missing Debian packages, installing: apt-get install -y$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

run: $(STAMP)
	dvc repro

test: $(STAMP) system-deps $(WEB_STAMP)
	pytest -m "slow or not slow" --durations=15

test-fast: $(STAMP)
	pytest

lint: $(STAMP)
	ruff check src stages tests
	ruff format --check src stages tests

format: $(STAMP)
	ruff format src stages tests
	ruff check --fix src stages tests

bench: $(STAMP)
	dvc repro pack
	python -m rnnflow.tools.bench

# Training tokens/s on 1 and on BENCH_PROCESSES processes (DDP), side by side, every variant:
# reports/bench_ddp.{json,md}
BENCH_PROCESSES ?= 2
bench-ddp: $(STAMP)
	dvc repro pack
	python -m rnnflow.tools.scaling \
	  --processes $(call checked,BENCH_PROCESSES,$(count_ok),a whole number 1-64)

# The browser demo: the champion bundle classified in the page by onnxruntime-web (npm,
# pinned by src/rnnflow/shipping/web/package-lock.json, installed into .web/ so that nothing
# of it lands on the Python path), served on http://127.0.0.1:$(DEMO_PORT)/ (Ctrl-C stops).
DEMO_PORT ?= 8000

web: $(WEB_STAMP)

$(WEB_STAMP): $(WEB_LOCK) src/rnnflow/shipping/web/package.json
	@command -v npm >/dev/null || { echo "make: npm missing, installing: apt-get install -y nodejs npm"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	mkdir -p .web
	cp src/rnnflow/shipping/web/package.json $(WEB_LOCK) .web/
	npm ci --prefix .web --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(WEB_STAMP)

demo: $(STAMP) $(WEB_STAMP)
	python -m rnnflow.tools.demo --port $(call checked,DEMO_PORT,$(port_ok),a port 1-65535)

# The champion raw-text model, served by MLflow's scoring server (Ctrl-C stops it):
#   curl -d '{"inputs": ["Nakamura", "O'"'"'Brien"]}' -H 'Content-Type: application/json' \
#        http://127.0.0.1:5001/invocations
SERVE_PORT ?= 5001
serve: $(STAMP)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  mlflow models serve -m models:/rnnflow@champion --env-manager local \
	  --host 127.0.0.1 --port $(call checked,SERVE_PORT,$(port_ok),a port 1-65535)

# A bounded load test of the same on its own server (LOADTEST_SECONDS, 8/16/32 clients):
# reports/serve.json
LOADTEST_SECONDS ?= 60
loadtest: $(STAMP)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  python -m rnnflow.tools.loadtest \
	    --seconds $(call checked,LOADTEST_SECONDS,$(secs_ok),a number of seconds above 0 and up to 3600)

# The memory-horizon sweep (README "Gradient flow and memory horizon"): one queued DVC
# experiment per length on the synthetic longrange task, two workers, then the report.
LONGRANGE_SET ?= -S data.source=longrange -S 'data.length=10,25,50,100' -S data.size=2000 \
	-S '~model.variants.rnn_deep' -S '~model.variants.rnn_cell' -S '~model.variants.rnn_cell_deep' \
	-S model.defaults.hidden_size=64 -S model.defaults.pool=last \
	-S train.epochs=30 -S train.patience=10 -S train.lr=0.005
longrange: $(STAMP)
	dvc exp run --queue $(LONGRANGE_SET) evaluate gradients
	dvc queue start -j 2
	python -m rnnflow.analysis.longrange

# An Optuna study over the model and training options (TPE, median pruning on the validation
# loss; storage: the team server's PostgreSQL when it runs, else .rnnflow/search/optuna.db),
# every trial an MLflow run; then the best options as a DVC experiment, search-STUDY
# (`dvc exp apply search-STUDY` writes them to params.yaml). SEARCH_ARGS: see --help.
SEARCH_ARGS ?=
search: $(STAMP)
	dvc repro pack
	python -m rnnflow.tools.search $(SEARCH_ARGS)

# Where a forced `dvc repro` spends its wall time, per stage: start-up, own work, tracking/IO,
# each stage cold (its own process) and with the warm stage server: reports/profile.{json,md}
profile: $(STAMP)
	python -m rnnflow.tools.profile

# The CUDA path end to end (pipeline, torchrun over NCCL, the refusal of 2 ranks on 1 GPU,
# the training bench on GPU and CPU, bf16), every step under a timeout: reports/gpu_check.*
# RNNFLOW_DEVICE=cpu runs it on the CPU; GPU_CHECK_ARGS=--quick: a small data sample.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	python -m rnnflow.tools.gpucheck $(GPU_CHECK_ARGS)

# The manual (docs/pages) as a site in docs/site; strict: a broken link fails the build.
docs: $(STAMP)
	mkdocs build --quiet -f docs/mkdocs.yml

ui: $(STAMP)
	mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

# The team tracking server: PostgreSQL + mlflow server on 127.0.0.1:5000, data in .rnnflow/server.
server: $(STAMP) system-deps
	python -m rnnflow.tracking.server start

server-stop: $(STAMP)
	python -m rnnflow.tracking.server stop

clean:
	rm -rf data/prepared data/tokenizer data/packed data/reports metrics models reports \
	       mlflow.db mlartifacts .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
