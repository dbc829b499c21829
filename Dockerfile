# syntax=docker/dockerfile:1
#
# Two stages, both installing from the lock files in requirements/ (`make lock`): exact versions, and
# pip refuses any file whose sha256 the lock does not list, so an image built next month holds what CI
# tested today. Each lock is copied alone before the source, so its install layer stays cached until
# that lock changes.
#   model    - CPU-only torch; runs the same `python -m training pretrained` that `make serve` runs, so
#              the image always carries a working default model (built at build time, never at run time).
#   runtime  - NVIDIA CUDA + cuDNN base, only the `serve` extra (no torch, no training code), non-root.
#
# GPU:  docker compose up                       (see docker-compose.yml)
# CPU:  docker compose -f docker-compose.yml -f docker-compose.cpu.yml up
#       (builds the same runtime stage on plain Ubuntu 24.04: RUNTIME_BASE=ubuntu:24.04)

# onnxruntime-gpu 1.31.x on PyPI is built against CUDA 13.0 and cuDNN 9 (its
# onnxruntime/capi/build_and_package_info.py says cuda_version = '13.0'; the CUDA provider links
# libcudart.so.13 and libcublas.so.13). This tag ships the CUDA 13.0 runtime libraries (cuBLAS,
# cuFFT, cuRAND) plus cuDNN 9 for CUDA 13. Host requirement: NVIDIA driver >= 580.65.06 (the R580
# branch, CUDA 13.0's minimum) and the NVIDIA Container Toolkit.
ARG RUNTIME_BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG BUILD_BASE=python:3.11-slim-bookworm

############################################################################################
FROM ${BUILD_BASE} AS model

# The `train` extra pins torch==2.14.1 / torchvision==0.29.1. From PyPI those are the CUDA builds,
# which drag in ~4 GB of nvidia-* and triton wheels (3.2 GB + 0.9 GB installed) that this stage never
# uses: it only exports one model on the CPU. So the CPU builds of the same versions come first, from
# PyTorch's CPU wheel index. They are pinned by version only: the lock's hashes are those of PyPI's
# files, which the "+cpu" builds are not.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG DEFAULT_MODEL=efficientnet_lite0_imagenet

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /build
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The rest of the train extra, locked without torch, torchvision and torch's CUDA libraries
# (requirements/no-cuda-overrides.txt). The lock lists every other package, so nothing is resolved
# (--no-deps); installing it also moves torch's own dependencies, which came from the CPU index, to the
# locked versions, and `pip check` then proves the whole set consistent, torch included. The export runs
# the training package from this directory: it is not installed, so only training/ changes re-run it.
COPY requirements/train.txt ./
RUN pip install --no-deps --require-hashes -r train.txt && pip check

# modelcontract/ is the torch-free model contract training and serving both import.
COPY modelcontract/ modelcontract/
COPY training/ training/
RUN python -m training pretrained --out "models/${DEFAULT_MODEL}"

############################################################################################
FROM ${RUNTIME_BASE} AS runtime

# Build-time only (an ARG, not an ENV): apt must not prompt, but the running container needs no such hint.
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python 3.12 in a venv (PEP 668 forbids pip into the system interpreter). Versions are
# not pinned: the base tag fixes the distribution release, and Ubuntu replaces exact package versions
# with security updates, so pins would only make old builds fail.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "${VIRTUAL_ENV}" \
    && groupadd --system --gid 10001 convserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin convserve

WORKDIR /opt/convserve/src

# Dependency layer: rebuilt only when the serve lock changes. Dependencies are resolved (not --no-deps):
# in hash-checking mode pip then refuses a dependency the lock does not list, so an incomplete lock fails
# here instead of at import. The lock serves this base's Python 3.12 as well as the 3.11 stand-in:
# requirements/lock.sh checks that both resolve to the same pins, and it lists every file's hash.
COPY requirements/serve.txt ./
RUN pip install --require-hashes -r serve.txt

# The service source, installed without touching the locked dependencies.
COPY pyproject.toml README.md ./
COPY modelcontract/ modelcontract/
COPY service/ service/
COPY convserve/ convserve/
RUN pip install --no-deps .

# The default model from the build stage. The service reads CONVSERVE_MODEL_REPOSITORY; compose mounts
# the host's ./models read-only at /app/models, and setting CONVSERVE_MODEL_REPOSITORY=models in .env
# serves that instead (see .env.example).
COPY --from=model /build/models /opt/convserve/models
COPY deploy/healthcheck.py /opt/convserve/healthcheck.py

ENV CONVSERVE_MODEL_REPOSITORY=/opt/convserve/models \
    CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_PORT=8000 \
    CONVSERVE_GRPC_PORT=8001

WORKDIR /app
USER 10001:10001
# HTTP (REST, /metrics, probes) and the V2 gRPC API.
EXPOSE 8000 8001

# /readyz is 200 only once the model is loaded and warmed up: on a CPU batch sizes 1 and the maximum;
# on a GPU the provider probe first (CUDA context, cuDNN, one test image, bounded at 120 s), then the
# batch sizes the batcher forms (1, 2, 4, ... up to the maximum). 300 s covers the probe's bound and
# the warmup with room for a slow node.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/convserve/healthcheck.py"]

CMD ["python", "-m", "service"]
