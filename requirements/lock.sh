#!/usr/bin/env bash
# Regenerates the lock files from pyproject.toml: `make lock`. Every pin already in a lock file is kept
# while pyproject.toml still allows it; `make lock LOCK_FLAGS=--upgrade` moves every pin to the newest
# release the ranges allow (or `LOCK_FLAGS="--upgrade-package uvicorn"` moves one).
#
#   dev.txt    what `make` and CI install: the dev extra, with serve and train (torch and torchvision as
#              PyPI ships them for Linux x86_64, CUDA libraries included). Python 3.11.
#   serve.txt  the runtime image: the serve extra alone, never torch. Compiled for Python 3.11 (the
#              replay test's interpreter) and checked below to resolve to the same pins for 3.12 (the
#              runtime base's python3), so one file serves both.
#   train.txt  the image's model stage: the train extra without torch, torchvision and torch's CUDA
#              libraries (no-cuda-overrides.txt); that stage installs the CPU builds of torch and
#              torchvision from PyTorch's CPU index first.
#
# serve.txt and train.txt are constrained by dev.txt, so a package has one version in all three. Every
# line carries the sha256 of every file PyPI has for that version; pip refuses a file that matches none.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
read -r -a extra_flags <<<"${LOCK_FLAGS:-}"
common=(--generate-hashes --python-platform x86_64-manylinux_2_28 --quiet --custom-compile-command "make lock")

"$UV" pip compile pyproject.toml --extra dev --python-version 3.11 "${common[@]}" "${extra_flags[@]}" \
    -o requirements/dev.txt
"$UV" pip compile pyproject.toml --extra serve --python-version 3.11 "${common[@]}" \
    -c requirements/dev.txt -o requirements/serve.txt
"$UV" pip compile pyproject.toml --extra train --python-version 3.11 "${common[@]}" \
    -c requirements/dev.txt --override requirements/no-cuda-overrides.txt \
    --no-emit-package torch --no-emit-package torchvision -o requirements/train.txt

pins() { grep -E '^[A-Za-z0-9]' "$1" | cut -d' ' -f1; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp requirements/serve.txt "$scratch/serve-3.12.txt"
"$UV" pip compile pyproject.toml --extra serve --python-version 3.12 "${common[@]}" \
    -c requirements/dev.txt -o "$scratch/serve-3.12.txt"
if ! diff <(pins requirements/serve.txt) <(pins "$scratch/serve-3.12.txt"); then
    echo "serve.txt resolves differently for Python 3.12 (the runtime image's python3); lines above." >&2
    echo "Compile a separate lock for 3.12 and install it in the Dockerfile's runtime stage." >&2
    exit 1
fi
if grep -qE '^(torch|torchvision|nvidia-|cuda-|triton)' requirements/train.txt; then
    echo "requirements/train.txt holds torch or a CUDA library: $(grep -E '^(torch|nvidia-|cuda-|triton)' \
        requirements/train.txt | cut -d' ' -f1 | tr '\n' ' ')" >&2
    echo "torch's dependencies changed: add the new CUDA packages to requirements/no-cuda-overrides.txt." >&2
    exit 1
fi
if grep -qE '^(torch|torchvision)==' requirements/serve.txt; then
    echo "requirements/serve.txt holds torch: the serve extra (or a dependency of it) pulls it in." >&2
    exit 1
fi
echo "requirements/dev.txt, serve.txt and train.txt are up to date"
