"""Class names for an imported model, read from a text or JSON file.

Text: one label per line, surrounding whitespace stripped, blank lines ignored. JSON (a `.json` file):
a list of labels, or an object mapping every index 0..K-1 to its label; a value may also be a list
whose last element is the name, as in Keras' `imagenet_class_index.json` (`{"0": ["n01440764",
"tench"]}`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convserve.errors import UsageError

MAX_LABELS_BYTES = 16 * 1024 * 1024
"""Largest labels file read, in bytes: far above any real class list, far below what hurts to load."""


def read_labels(path: Path) -> tuple[str, ...]:
    """The labels in `path`, in index order; `UsageError` saying what is wrong with the file."""
    try:
        size = path.stat().st_size
        if size > MAX_LABELS_BYTES:
            raise UsageError(
                f"labels file {path} is {size} bytes, more than {MAX_LABELS_BYTES}; is it the right file?"
            )
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(
            f"labels file {path} does not exist; pass --labels FILE (one label per line, or JSON)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read labels file {path}: {exc}; it must be UTF-8 text or JSON") from None
    labels = _from_json(text, path) if path.suffix.lower() == ".json" else _from_lines(text)
    if len(labels) < 2:
        raise UsageError(f"labels file {path} holds {len(labels)} label(s); a classifier needs at least 2")
    return labels


def _from_lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _from_json(text: str, path: Path) -> tuple[str, ...]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"labels file {path} is not valid JSON ({exc}); or name it .txt, one label per line"
        ) from None
    if isinstance(document, list):
        return tuple(_label(value, f"item {index}", path) for index, value in enumerate(document))
    if isinstance(document, dict):
        expected = [str(index) for index in range(len(document))]
        if sorted(document, key=_index_order) != expected:
            raise UsageError(
                f"labels file {path}: the object's keys must be the indices 0 to {len(document) - 1}, "
                "each once"
            )
        return tuple(_label(document[key], f"index {key}", path) for key in expected)
    raise UsageError(f"labels file {path} must hold a JSON list of labels or an object index -> label")


def _index_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isascii() and key.isdigit() else (-1, key)


def _label(value: Any, where: str, path: Path) -> str:
    if isinstance(value, list) and value:  # Keras' [wordnet id, name] pairs
        value = value[-1]
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"labels file {path}: {where} must be a non-empty string, got {value!r}")
    return value.strip()
