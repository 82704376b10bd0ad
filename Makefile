# workerhost: the user's front door.
#
#   make serve         set up everything, build the images, run `workerhost serve` (the main job)
#   make demo          set up everything, build the images, run each example worker once
#   make test          set up everything, build the images, run the whole test suite
#   make build-images  base images (Python 3.11, 2.7) and every workers/*/Dockerfile
#   make bench         overheads and targets, each against a baseline measured in the same run
#   make lint          ruff and mypy
#   make sandbox       install gVisor and register it with the engine (for sandbox = "strict")
#   make doctor        what the engine offers, and whether the config can run on it
#
# Set-up is part of every target: a Python virtualenv in .venv with workerhost
# installed, and a Docker engine (scripts/engine.sh installs and starts one
# when run as root on Debian; it never touches an engine that already runs).

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install engine sandbox doctor build-images build-bases build-workers serve demo test test-unit lint bench clean-containers

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

engine:
	scripts/engine.sh

# gVisor (runsc) for strict workers: installed and registered with the engine, only
# when this machine's engine is ours to change (root, the local socket).
sandbox: engine
	scripts/engine.sh --sandbox

build-bases: engine
	images/build-bases.sh

build-workers: install build-bases
	$(PY) images/build_workers.py

build-images: build-bases build-workers

serve: install build-images
	$(BIN)/workerhost serve

demo: install build-images
	scripts/demo.sh $(BIN)/workerhost

# The strict-sandbox tests need gVisor; where it cannot be set up they skip
# (and under CI=true, fail), so a failed `sandbox` does not stop the run here.
test: install build-images
	-scripts/engine.sh --sandbox
	-scripts/browser.sh
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

doctor: install engine
	$(BIN)/workerhost doctor

bench: install build-images
	$(PY) bench/bench_runner.py
	$(PY) bench/bench_serve.py
	$(PY) bench/bench_tracing.py
	$(PY) bench/bench_sources.py
	$(PY) bench/bench_modes.py
	-$(PY) bench/bench_sandbox.py

# Remove containers that workerhost left behind (a killed host, an interrupted test run).
clean-containers: engine
	@ids=$$(docker ps -aq --filter label=workerhost.host_id); \
	if [ -n "$$ids" ]; then docker rm -f $$ids; else echo "no workerhost containers"; fi
