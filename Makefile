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

# The committed lock (requirements/, made by `make lock`): every package but torch, pinned
# with hashes, for CPython 3.11 on linux x86_64. torch stays out of it (its build, CPU or
# CUDA, comes from TORCH_SPEC) but its own dependencies are in it. runtime.lock: the server
# (the Dockerfile); dev.lock: runtime + dev + bench extras + build tools (make install);
# build.lock: the wheel build (the Dockerfile); no-deps.lock: installed without dependencies.
LOCK := requirements
LOCKS := $(LOCK)/runtime.lock $(LOCK)/dev.lock $(LOCK)/build.lock $(LOCK)/no-deps.lock \
	$(LOCK)/triton.lock
# The third-party clients the integration tests drive (LangChain, LiteLLM, sglang-router, ...)
# pin huggingface-hub and openai against the server's own: they get a venv of their own.
CLIENTS_VENV ?= .venv-clients
PIP_LOCKED := $(PY) -m pip install -q --require-hashes --no-deps

.PHONY: install clients serve test lint format lock upstream-check bench bench-engine bench-http random-base embedded-model clean browser soak

$(VENV)/.installed: pyproject.toml $(LOCKS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PIP_LOCKED) -r $(LOCK)/dev.lock
	# TGI's Python client pins huggingface-hub<1.0, which transformers 5 cannot use; its
	# code works with the newer hub, so it is locked and installed without its pins.
	$(PIP_LOCKED) -r $(LOCK)/no-deps.lock
	# Triton for the GPU kernel's interpreter tests: CUDA torch brings its own matched build.
	$(PY) -c "import triton" 2>/dev/null || $(PIP_LOCKED) -r $(LOCK)/triton.lock
	# The package itself, built with the locked setuptools (no unpinned build-isolation download).
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

$(CLIENTS_VENV)/.installed: $(LOCK)/clients.lock
	$(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install -q --require-hashes --no-deps -r $(LOCK)/clients.lock
	touch $@

clients: $(CLIENTS_VENV)/.installed

serve: install
	$(VENV)/bin/kogpt-serve $(ARGS)

test: install clients browser
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

# On a CUDA host (a few minutes on one H100): tests/gpu, then the decode-step benchmark
# (Triton paged attention vs gather + SDPA, graphs replayed, bf16 and fp16, the 125M shape
# with random weights) into docs/benchmarks/gpu_check.json, then the engine benchmark at
# 1/16/64/256 and the HTTP benchmark at 64 in bf16 into docs/benchmarks/gpu/. Without CUDA:
# the same script's CPU dry run (tiny sizes, Triton's interpreter, the benchmarks at toy
# sizes; `make test` runs it too), figures to a temporary folder.
# ARGS="--skip-tests", "--skip-benchmarks", "--repeat 11", "--out PATH".
.PHONY: gpu-check
gpu-check: random-base
	$(PY) -m tests.gpu.gpu_check $(ARGS)

# Opt-in, never in CI: random-weight KoGPT-2-base checkpoint, then the engine benchmark.
random-base: install
	$(PY) models/build_random_base.py

bench-engine: random-base
	$(PY) -m tests.benchmarks.engine $(ARGS)

# A real server on 127.0.0.1 under streaming load, then the same mix in-engine.
bench-http: random-base
	$(PY) -m tests.benchmarks.http_load $(ARGS)

# Opt-in, never in CI (about 4 minutes on 2 cores): 2 replicas of the embedded model (one torch
# thread each) behind sglang-router, cache-aware against round-robin routing on 8 few-shot
# tasks, and a single server's hit rate; writes docs/benchmarks/scale_out.json and .png.
# ARGS="--scale-down": SIGTERM to one replica under load (docs/benchmarks/scale_down.json).
.PHONY: bench-scale-out
bench-scale-out: install clients
	$(PY) -m tests.benchmarks.scale_out $(ARGS)

bench: bench-engine

# Opt-in, never in CI: a real server under 64 concurrent mixed requests for 10 minutes
# (ARGS="--minutes 30" to change); writes docs/reliability/soak.json and soak.png.
soak: install
	$(PY) -m tests.soak.soak $(ARGS)

# Rebuild the embedded model from the konlpy corpus (~15 minutes on 2 cores).
embedded-model: install
	$(PY) -m pip install -q -e ".[train]"
	$(PY) models/build_embedded.py

# Refresh the lock from pyproject's ranges (newest versions they allow). torch's own
# dependencies are resolved against the CPU wheel: TORCH_WHEELS holds it (a pip find-links
# folder; this machine's is /opt/wheels), so no CUDA-only package enters the lock.
TORCH_WHEELS ?= /opt/wheels
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --upgrade --generate-hashes \
	--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--no-emit-package torch --custom-compile-command "make lock" \
	--find-links $(TORCH_WHEELS) --constraint $(LOCK)/torch.constraint
lock: install
	@test -d $(TORCH_WHEELS) || { echo "lock: TORCH_WHEELS=$(TORCH_WHEELS) is not a folder with the CPU torch wheel"; exit 2; }
	echo "$(firstword $(TORCH_SPEC))" > $(LOCK)/torch.constraint
	$(UV_COMPILE) pyproject.toml -o $(LOCK)/runtime.lock
	$(UV_COMPILE) pyproject.toml $(LOCK)/build.in --extra dev --extra bench -o $(LOCK)/dev.lock
	$(UV_COMPILE) $(LOCK)/build.in -o $(LOCK)/build.lock
	$(UV_COMPILE) $(LOCK)/no-deps.in --no-deps -o $(LOCK)/no-deps.lock
	$(UV_COMPILE) $(LOCK)/triton.in -o $(LOCK)/triton.lock
	$(UV_COMPILE) $(LOCK)/clients.in -o $(LOCK)/clients.lock
	rm $(LOCK)/torch.constraint
	@echo "lock: refreshed; run make test (the float64 conformance suite) before committing it"

# Not in CI: the conformance suite against the newest transformers (or TRANSFORMERS_SPEC) in a
# scratch venv; prints which generate options changed behaviour against the locked release.
TRANSFORMERS_SPEC ?= transformers
upstream-check: install
	$(PY) -m tests.conformance.upstream_check --spec "$(TRANSFORMERS_SPEC)" --torch-spec "$(TORCH_SPEC)" $(ARGS)

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) .pytest_cache .ruff_cache .hypothesis

# Opt-in, never in CI (4 to 5 minutes cold, 2 with the layer cache): build the CPU image
# from the Dockerfile with docker, or podman when no docker daemon answers (installed with
# apt-get), and run it for real: the embedded model and models/kogpt2-base-random mounted
# read-only, HEALTHCHECK, /generate, /generate_stream, /v1/completions, non-root, the drain
# on stop; then the compose stack with Prometheus. ARGS="--no-cache" for a cold build,
# "--skip-compose", "--engine podman"; see docs/deployment.md.
.PHONY: image-check
image-check: random-base
	$(PY) -m tests.deploy.image_check --torch-wheels $(TORCH_WHEELS) $(ARGS)
