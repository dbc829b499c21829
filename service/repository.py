"""Find the model to serve in a repository laid out as `<root>/<name>/<version>/model.onnx`.

Versions are positive integer directory names; a version counts only once its `model.onnx` exists
(the exporter moves the file in last), so a half-finished export is never picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.errors import StartupError

MODEL_FILENAME = "model.onnx"


@dataclass(frozen=True)
class ModelLocation:
    """One resolved model version."""

    name: str
    version: int
    path: Path
    """The `model.onnx` file."""
    available_versions: tuple[int, ...]
    """Every complete version of this model in the repository, ascending."""


def model_versions(model_dir: Path) -> list[int]:
    """Complete versions (integer directories holding `model.onnx`) of one model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in model_dir.iterdir()
        if child.name.isdigit() and int(child.name) > 0 and (child / MODEL_FILENAME).is_file()
    )


def list_models(root: Path) -> list[str]:
    """Names of the models in the repository that have at least one complete version."""
    if not root.is_dir():
        return []
    return sorted(
        child.name
        for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".") and model_versions(child)
    )


def resolve_model(root: Path, name: str | None = None, version: int | None = None) -> ModelLocation:
    """The model to serve: `name` (default: the only model) at `version` (default: the latest)."""
    if not root.is_dir():
        raise StartupError(
            f"model repository {str(root)!r} does not exist; build a model with "
            f"`python -m training pretrained --out {root}/<name>` or set CONVSERVE_MODEL_REPOSITORY"
        )
    models = list_models(root)
    if not models:
        raise StartupError(
            f"model repository {str(root)!r} holds no model (expected <name>/<version>/{MODEL_FILENAME}); "
            f"build one with `python -m training pretrained --out {root}/<name>`"
        )
    if name is None:
        if len(models) > 1:
            raise StartupError(
                f"model repository {str(root)!r} holds several models {models}; "
                "choose one with CONVSERVE_MODEL_NAME"
            )
        name = models[0]
    elif name not in models:
        raise StartupError(
            f"model {name!r} (CONVSERVE_MODEL_NAME) is not in repository {str(root)!r}; available: {models}"
        )
    versions = model_versions(root / name)
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise StartupError(
            f"model {name!r} has no version {version} (CONVSERVE_MODEL_VERSION); available: {versions}"
        )
    return ModelLocation(
        name=name,
        version=version,
        path=root / name / str(version) / MODEL_FILENAME,
        available_versions=tuple(versions),
    )
