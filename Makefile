# The targets here are the commands humans, CI (.ci/run) and the Dockerfile all run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_REPOSITORY ?= models
DEFAULT_MODEL ?= efficientnet_lite0_imagenet

# Build arguments of the image test (make image-test BUILD_BASE=...): the CPU variant's real bases and
# PyTorch's CPU index. Where they cannot be pulled or reached, the test uses locally built stand-in
# bases and PyPI's torch, and says so.
BUILD_BASE ?= python:3.11-slim-bookworm
RUNTIME_BASE ?= ubuntu:24.04
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
export BUILD_BASE RUNTIME_BASE TORCH_INDEX_URL

.PHONY: help serve test lint typecheck pytest image-test compose-test gpu-check bench bench-quick peers model tools lock docs proto clean

help:
	@echo "make serve  - set up the venv, build the default ImageNet model if $(MODEL_REPOSITORY)/ is empty, start the service"
	@echo "make test   - set up the venv, then lint, type-check and run the whole test suite"
	@echo "make image-test - build the CPU image and test the running container (needs a Docker daemon)"
	@echo "make compose-test - run docker-compose.yml + docker-compose.cpu.yml and test the stack (needs Docker)"
	@echo "make gpu-check - prove the CUDA path on this host's GPU in ~5 min (without one: a dry run on the CPU)"
	@echo "make bench  - run the benchmarks (make bench-quick for the short version)"
	@echo "make peers  - build .venv/peers/bentoml, the BentoML peer's own venv (make bench does it)"
	@echo "make bench-fewshot - galleries of a few examples per class against raw pixels (~5 min)"
	@echo "make bench-galleries - galleries of 10^4 and 10^5 entries through a real server (~10 min)"
	@echo "make docs   - regenerate docs/configuration.md, docs/cli.md and the figures in docs/ from the results JSON"
	@echo "make proto  - regenerate the gRPC message classes from service/protocols/v2proto/*.proto"
	@echo "make lock   - regenerate requirements/*.txt from pyproject.toml (LOCK_FLAGS=--upgrade to move every pin)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# The venv holds exactly the lock (requirements/dev.txt: versions pinned, every file's hash checked),
# then the project itself without dependencies, so nothing is resolved anew on the day of the install.
# tests/deploy/test_deploy_lockfiles.py fails when the lock no longer satisfies pyproject.toml: `make lock`.
$(VENV)/.stamp-lock: requirements/dev.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --no-deps -e .
	$(BIN)/pip check
	touch $@

# Regenerates requirements/*.txt from pyproject.toml (see requirements/lock.sh); LOCK_FLAGS=--upgrade
# moves every pin to the newest release the ranges allow.
lock: $(VENV)/.stamp-lock
	UV=$(BIN)/uv LOCK_FLAGS="$(LOCK_FLAGS)" bash requirements/lock.sh

# Builds the default model only when the repository holds no model at all.
model: $(VENV)/.stamp-lock
	@if [ -z "$$(find $(MODEL_REPOSITORY) -name model.onnx 2>/dev/null | head -n 1)" ]; then \
		$(BIN)/python -m training pretrained --out $(MODEL_REPOSITORY)/$(DEFAULT_MODEL); \
	else echo "model repository $(MODEL_REPOSITORY)/ already holds a model; not rebuilding"; fi

serve: model
	CONVSERVE_MODEL_REPOSITORY=$(MODEL_REPOSITORY) $(BIN)/python -m service

# Static tools the tests use that are not Python packages (promtool from Debian's prometheus; kubectl,
# which renders the kustomize manifests offline; chromium, the browser tests/ui drives with Playwright).
tools:
	@command -v promtool >/dev/null 2>&1 || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
		|| echo "NOTE: could not install promtool; the Prometheus config test will be skipped"; }
	@command -v kubectl >/dev/null 2>&1 || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubectl >/dev/null) \
		|| echo "NOTE: could not install kubectl; the Kubernetes manifest tests will be skipped"; }
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
		|| echo "NOTE: could not install chromium; the upload page's browser tests will be skipped"; }

lint: $(VENV)/.stamp-lock
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.stamp-lock
	$(BIN)/mypy

pytest: $(VENV)/.stamp-lock tools
	$(BIN)/pytest

test: lint typecheck pytest

# The image test alone. `make test` runs it too (inside pytest) when a Docker daemon answers, and
# otherwise reports it skipped with how to enable it.
image-test: $(VENV)/.stamp-lock
	$(BIN)/pytest -m image tests/deploy

# The compose test alone: `docker compose up` of the CPU stack (service + Prometheus) with the offline
# override tests/deploy/compose/offline.yml. `make test` runs it too when a Docker daemon answers.
compose-test: $(VENV)/.stamp-lock
	$(BIN)/pytest -m compose tests/deploy

# On a GPU host: the CUDA tests, the GPU image started with REQUIRE_GPU=true on a read-only root, CUDA
# against CPU logits on real photos, img/s and GPU utilisation at 32 clients, one summary line. Without
# a GPU (or GPU_CHECK_DRY=1) the same steps run dry on the CPU, without Docker. See docs/gpu.md.
gpu-check: $(VENV)/.stamp-lock model
	$(BIN)/python -m benchmarks.gpucheck

# The BentoML peer's own venv (.venv/peers/bentoml, from benchmarks/peers/bentoml-requirements.txt):
# BentoML's pins would fight the project's lock. The module rebuilds it only when the pins changed.
peers: $(VENV)/.stamp-lock
	$(BIN)/python -m benchmarks.peers.peer_venv

bench: $(VENV)/.stamp-lock model peers
	$(BIN)/python -m benchmarks

bench-quick: $(VENV)/.stamp-lock model peers
	$(BIN)/python -m benchmarks --quick

# Hostile files and clients, 2x overload, slow clients and SIGTERM under load against a real server (~5 min).
.PHONY: soak
soak: $(VENV)/.stamp-lock model
	$(BIN)/python -m benchmarks --robustness

# Few-shot galleries against raw pixels (~5 min): benchmarks/results/fewshot.json and docs/galleries.md's block.
.PHONY: bench-fewshot
bench-fewshot: $(VENV)/.stamp-lock
	$(BIN)/python -m benchmarks.fewshot

# Galleries of 10^4 and 10^5 entries through a real server (~10 min): query latency, memory per entry and
# /predict under a stream of adds; benchmarks/results/gallery_scale.json and docs/galleries.md's block.
.PHONY: bench-galleries
bench-galleries: $(VENV)/.stamp-lock model
	$(BIN)/python -m benchmarks.fewshot.scale

# The generated parts of docs/: the configuration reference from the Settings class, and the figures
# blocks from benchmarks/results/*.json (nothing is measured). tests/docs checks they are current.
docs: $(VENV)/.stamp-lock
	$(BIN)/python docs/generate.py
	$(BIN)/python -m benchmarks --report-only --update-docs yes
	$(BIN)/python -m benchmarks --robustness --report-only --update-docs yes
	$(BIN)/python -m benchmarks.fewshot --report-only
	$(BIN)/python -m benchmarks.fewshot.scale --report-only

# The gRPC message classes beside their .proto (imported as service.protocols.v2proto.*); no service
# classes: the server and client name Triton's service path themselves (service/protocols/v2proto).
# tests/service/test_v2_grpc_proto.py fails when the committed ones differ from what this generates.
proto: $(VENV)/.stamp-lock
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
		service/protocols/v2proto/grpc_service.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
