"""The model repository on disk, `<root>/<name>/<version>/model.onnx`, and which versions to serve.

Versions are positive integer directory names; a version counts only once its `model.onnx` exists
(the exporter moves the file in last), so a half-finished export is never picked. Which of a
model's versions are served is a `VersionPolicy`, in Triton's vocabulary: `latest` (the newest
only), `latest:N`, `all`, `specific:1,3`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelcontract import MODEL_FILENAME, complete_versions


@dataclass(frozen=True)
class ModelLocation:
    """One model version on disk."""

    name: str
    version: int

    def path(self, root: Path) -> Path:
        """Its `model.onnx` under repository `root`."""
        return root / self.name / str(self.version) / MODEL_FILENAME


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve: the newest `latest` ones, `specific` ones, or all."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `latest:N`, `all` or `specific:V[,V...]`; `ValueError` naming the forms otherwise."""
        kind, _, argument = text.strip().lower().partition(":")
        try:
            if kind == "all" and not argument:
                return cls(latest=None)
            if kind == "latest":
                count = int(argument) if argument else 1
                if count >= 1:
                    return cls(latest=count)
            if kind == "specific":
                versions = tuple(sorted({int(part) for part in argument.split(",") if part.strip()}))
                if versions and versions[0] >= 1:
                    return cls(latest=None, specific=versions)
        except ValueError:
            pass
        raise ValueError(
            f"version policy {text!r} is not one of latest, latest:N, all, specific:V[,V...] "
            "(N and V positive integers)"
        )

    def select(self, versions: list[int]) -> list[int]:
        """The versions to serve among `versions` (ascending)."""
        if self.specific:
            return [v for v in versions if v in self.specific]
        if self.latest is None:
            return list(versions)
        return list(versions[-self.latest :])

    def __str__(self) -> str:
        if self.specific:
            return "specific:" + ",".join(map(str, self.specific))
        return "all" if self.latest is None else f"latest:{self.latest}"


def list_models(root: Path) -> list[str]:
    """Names of the models in the repository that have at least one complete version."""
    if not root.is_dir():
        return []
    return sorted(
        child.name
        for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".") and complete_versions(child)
    )


def scan(root: Path, names: list[str] | None = None) -> dict[str, list[int]]:
    """Every model in scope (`names`, or all in the repository) with its complete versions."""
    return {
        name: complete_versions(root / name) for name in (names if names is not None else list_models(root))
    }
