"""The model repository on disk: `<root>/<name>/<version>/model.onnx`, numbered and published atomically.

Training numbers versions past the highest integer directory and publishes one by renaming a
complete directory into place; serving counts a version only once its `model.onnx` exists, so it
never sees half an export.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_FILENAME = "model.onnx"
"""The ONNX file of one version, inside `<root>/<name>/<version>/`."""


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
