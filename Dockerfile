# syntax=docker/dockerfile:1
#
# kogpt-serve container image: one Dockerfile, two variants chosen by a build argument.
#
#   GPU (default, CUDA 12.8 torch wheel):
#     docker build -t kogpt-serve:cuda .
#   CPU only (no CUDA libraries: a few GB smaller than the GPU image):
#     docker build --build-arg TORCH_VARIANT=cpu -t kogpt-serve:cpu .
#
# The GPU variant takes torch from the PyTorch index for TORCH_VARIANT (cu128 needs an NVIDIA
# driver >= 570 on the host; cu126 works with older drivers, cu130 needs >= 580). The wheel
# carries its own CUDA runtime libraries, so a slim Python base is enough: the host driver is
# mounted in by the NVIDIA Container Toolkit (`docker run --gpus all`, compose device
# reservations, or the Kubernetes device plugin).
#
# Any base with Python 3.11, venv and apt works as PYTHON_IMAGE (only `python3` is assumed, not
# `python`/`pip`): `make image-check` builds on a Debian bookworm base made with mmdebstrap when
# no registry is reachable. docker/wheels/ (in the build context, empty in git) is a pip
# find-links folder offered to every install of the `deps` stage: put the torch wheel there
# when TORCH_INDEX_URL is out of reach (hashes of the locked packages are checked all the same).
#
# Stages: `deps` (venv with torch + the project's locked dependencies; rebuilt only when
# requirements/runtime.lock or a torch argument changes), `wheel` (the kogpt-serve wheel; rebuilt when
# app/ changes, seconds) and `runtime` (non-root, the embedded model baked in).
# See docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS deps

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:${PATH}

# torch first and alone: the largest layer, keyed on the torch arguments (BuildKit also on the
# files in docker/wheels/; podman 4.3's buildah does not look at them: --no-cache after
# swapping a wheel of the same version there).
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    python3 -m venv /opt/venv \
    && pip install --no-cache-dir --find-links /tmp/wheels \
       "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
# The runtime dependencies exactly as locked (requirements/runtime.lock, `make lock`): pinned
# with hashes, torch excluded (it came from its own index above) but its dependencies in.
COPY requirements/runtime.lock ./
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    pip install --no-cache-dir --find-links /tmp/wheels --require-hashes --no-deps -r runtime.lock

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# The build tools as locked (requirements/build.lock), in a venv of their own.
COPY requirements/build.lock ./
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes --no-deps -r build.lock
# `pip wheel .` needs the metadata files (pyproject.toml names README.md as the readme) and
# the package itself; nothing else of the repository is in the build context.
COPY pyproject.toml README.md ./
COPY app ./app
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cu128
LABEL org.opencontainers.image.title="kogpt-serve" \
      org.opencontainers.image.description="Inference server for Korean GPT-2 (KoGPT-2) models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.kogpt-serve.torch-variant="${TORCH_VARIANT}"

ENV PATH=/opt/venv/bin:${PATH} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/kogpt/.cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    KOGPT_HOST=0.0.0.0 \
    KOGPT_PORT=8000 \
    KOGPT_MODEL=/opt/kogpt/models/kogpt2-mini

# Unprivileged user with a fixed uid (Kubernetes runAsUser / volume ownership use 10001).
# /models is the mount point for real checkpoints (KOGPT_MODEL=/models/<dir>).
RUN groupadd --system --gid 10001 kogpt \
    && useradd --system --uid 10001 --gid kogpt --create-home --home-dir /home/kogpt \
       --shell /usr/sbin/nologin kogpt \
    && mkdir -p /models /home/kogpt/.cache/huggingface \
    && chown -R kogpt:kogpt /models /home/kogpt

# A C compiler for the native decode attention (app/modeling/native.py): the kernel
# is compiled at first start for the host's own CPU (-march=native), so not at build time;
# into ~/.cache/kogpt-serve (an emptyDir in docker/k8s). Without it, CPU decode attention
# falls back to torch. The packages follow the base image's Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

COPY --from=deps /opt/venv /opt/venv
# The embedded default model (changes rarely: before the source so it stays cached).
COPY models/kogpt2-mini /opt/kogpt/models/kogpt2-mini
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && kogpt-serve --help > /dev/null \
    && python3 -c "import app.main"

# Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /home/kogpt
EXPOSE 8000

# /health answers once the model is loaded (uvicorn serves after the lifespan start-up), so
# the start period covers loading a large checkpoint.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('KOGPT_PORT', '8000'), timeout=4)"]

# SIGTERM starts the server's drain (503 to new requests, in-flight ones finish for up to
# KOGPT_SHUTDOWN_GRACE_SECONDS, default 30): give `docker stop` a longer timeout (-t 40).
STOPSIGNAL SIGTERM
ENTRYPOINT ["kogpt-serve"]
CMD []
