"""The model repository on disk, `<root>/<name>/<version>/model.onnx`, and which versions to serve.

Versions are positive integer directory names; a version counts only once its `model.onnx` exists
(the exporter moves the file in last), so a half-finished export is never picked. Which of a
model's versions are served is a `VersionPolicy`, in Triton's vocabulary: `latest` (the newest
only), `latest:N`, `all`, `specific:1,3` (`service.versionpolicy`, read with the settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelcontract import MODEL_FILENAME, complete_versions
from service.errors import NotFoundError
from service.textsafety import printable

MAX_NAME_BYTES = 255
"""Longest model name, in UTF-8 bytes: a directory name on Linux file systems."""
MAX_VERSION_DIGITS = 18
"""Longest version number a client may send, in digits (below 2**63, and far below Python's 4,300-digit
limit on int(), which would otherwise turn a long digit string into a 500)."""


@dataclass(frozen=True)
class ModelLocation:
    """One model version on disk."""

    name: str
    version: int

    def path(self, root: Path) -> Path:
        """Its `model.onnx` under repository `root`."""
        return root / self.name / str(self.version) / MODEL_FILENAME


def check_model_name(name: str) -> str:
    """`name` if it could be a model of a repository; 404 for what can never be one.

    A client's model name is only ever compared with names the repository scan lists or the registry
    holds; this check keeps impossible ones (paths, hidden entries, over-long strings) out of those
    comparisons and out of error messages.
    """
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise NotFoundError(
            f"no such model: a model name is 1 to {MAX_NAME_BYTES} bytes long, got {len(name)} characters"
        )
    if name.startswith(".") or any(char in name for char in "/\\\0"):
        raise NotFoundError(
            f"no such model: {printable(name, 80)!r} is not a model name: names are repository "
            "directories, without separators or a leading dot"
        )
    return name


def parse_version(text: str) -> int:
    """A client's version number: a positive integer of at most `MAX_VERSION_DIGITS` digits, else 404
    (no version can have that name)."""
    cleaned = text.strip()
    if not (0 < len(cleaned) <= MAX_VERSION_DIGITS and cleaned.isascii() and cleaned.isdigit()):
        raise NotFoundError(
            f"no such version: {printable(cleaned, 40)!r} is not a positive integer of at most "
            f"{MAX_VERSION_DIGITS} digits"
        )
    version = int(cleaned)
    if version < 1:
        raise NotFoundError("no such version: versions start at 1")
    return version


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
