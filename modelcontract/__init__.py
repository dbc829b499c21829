"""The model contract between training and serving, in one torch-free place both import.

A model repository is `<root>/<name>/<version>/model.onnx`. Training numbers versions past the
highest integer directory and publishes one by renaming a complete directory into place; serving
counts a version only once its `model.onnx` exists, so it never sees half an export. The ONNX file's
`metadata_props` hold one key, `METADATA_KEY`, with the JSON the service rebuilds preprocessing from
(resize with one of `INTERPOLATIONS`). Probabilities are `softmax` of the logits on both sides.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

METADATA_KEY = "convserve"
MODEL_FILENAME = "model.onnx"
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def version_numbers(model_dir: Path) -> list[int]:
    """Every version number taken under `model_dir` (positive integer directories), ascending.

    Used for numbering: a directory counts even while empty or broken, so a number is never reused.
    """
    if not model_dir.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in model_dir.iterdir()
        if child.is_dir() and child.name.isascii() and child.name.isdigit() and int(child.name) > 0
    )


def complete_versions(model_dir: Path) -> list[int]:
    """The versions that can be served: numbered directories holding `model.onnx`, ascending."""
    return [v for v in version_numbers(model_dir) if (model_dir / str(v) / MODEL_FILENAME).is_file()]


def publish_version(staging: Path, model_dir: Path) -> Path:
    """Move a fully written `staging` directory to `model_dir/<highest version + 1>` in one rename.

    A number already taken (even by a stray file) is skipped, never replaced.
    """
    versions = version_numbers(model_dir)
    candidate = (versions[-1] if versions else 0) + 1
    while True:
        target = model_dir / str(candidate)
        if not target.exists():
            try:
                os.rename(staging, target)
            except OSError:
                if not target.exists():
                    raise
            else:
                return target
        candidate += 1


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (numerically stable)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))
