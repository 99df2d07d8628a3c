# kogpt-serve: `make serve` starts the server on the embedded model, `make test` runs the suite.
# Both create .venv and install what they need first (torch before everything else, so a
# plain `torch` requirement never pulls a multi-GB CUDA wheel on a CPU machine).
#
# GPU hosts: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install serve test lint format bench bench-engine random-base embedded-model clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,bench]"
	# TGI's Python client pins huggingface-hub<1.0, which transformers 5 cannot use; its
	# code works with the newer hub, so it is installed without its pins (tests use it).
	$(PY) -m pip install -q --no-deps text-generation
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/kogpt-serve $(ARGS)

test: install
	$(VENV)/bin/ruff check app tests models
	$(VENV)/bin/ruff format --check app tests models
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check app tests models
	$(VENV)/bin/ruff format --check app tests models

format: install
	$(VENV)/bin/ruff format app tests models
	$(VENV)/bin/ruff check --fix app tests models

# Opt-in, never in CI: random-weight KoGPT-2-base checkpoint, then the engine benchmark.
random-base: install
	$(PY) models/build_random_base.py

bench-engine: random-base
	$(PY) -m tests.benchmarks.engine $(ARGS)

bench: bench-engine

# Rebuild the embedded model from the konlpy corpus (~15 minutes on 2 cores).
embedded-model: install
	$(PY) -m pip install -q -e ".[train]"
	$(PY) models/build_embedded.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
