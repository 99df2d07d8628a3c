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

.PHONY: install serve test lint format bench bench-engine bench-http random-base embedded-model clean browser soak

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

test: install browser
	$(VENV)/bin/ruff check app tests models
	$(VENV)/bin/ruff format --check app tests models
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

# Best effort, never fails: Chromium, chromedriver and a Hangul font for the playground's
# browser test (tests/browser is skipped, with the reason, without them).
BROWSER_PACKAGES := chromium chromium-driver fonts-nanum
browser:
	@if command -v chromedriver >/dev/null 2>&1 && { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1; then \
		echo "browser: Chromium and chromedriver found"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "browser: skipped (needs root and apt-get; install $(BROWSER_PACKAGES) yourself to run tests/browser)"; \
	else \
		echo "browser: apt-get install $(BROWSER_PACKAGES)"; \
		{ DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES) >/dev/null 2>&1 \
		  || { timeout 300 apt-get update -qq >/dev/null 2>&1 \
		       && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES) >/dev/null 2>&1; }; } \
		|| echo "browser: apt-get failed or timed out; tests/browser will be skipped"; \
	fi

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

# A real server on 127.0.0.1 under streaming load, then the same mix in-engine.
bench-http: random-base
	$(PY) -m tests.benchmarks.http_load $(ARGS)

bench: bench-engine

# Opt-in, never in CI: a real server under 64 concurrent mixed requests for 10 minutes
# (ARGS="--minutes 30" to change); writes docs/reliability/soak.json and soak.png.
soak: install
	$(PY) -m tests.soak.soak $(ARGS)

# Rebuild the embedded model from the konlpy corpus (~15 minutes on 2 cores).
embedded-model: install
	$(PY) -m pip install -q -e ".[train]"
	$(PY) models/build_embedded.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
