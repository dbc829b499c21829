"""The `convserve` metadata a model carries inside its ONNX file, read without torch.

The training side writes it (`training.export.build_metadata`); this module only parses and checks
it, so a model exported by anything else fails at load time with a message naming the bad field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from modelcontract import INTERPOLATIONS, METADATA_KEY


class MetadataError(ValueError):
    """The model's `convserve` metadata is missing or does not follow the contract."""


@dataclass(frozen=True)
class ModelMetadata:
    """What the service needs to know about a model: labels and its evaluation transform."""

    labels: tuple[str, ...]
    input_shape: tuple[int, int, int]
    """(channels, height, width) of one input image."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int
    """Shorter image side in pixels after resizing, before the center crop."""
    interpolation: str
    backbone: str
    val_accuracy: float | None
    created: str | None
    raw: dict[str, Any]
    """The whole metadata JSON, for the metadata endpoints."""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @classmethod
    def from_json(cls, text: str | None, source: str) -> ModelMetadata:
        """Parse and check the metadata JSON; `source` (the file) goes into error messages."""
        if text is None:
            raise MetadataError(
                f"{source} has no {METADATA_KEY!r} metadata; export it with `python -m training export` "
                "so it carries its labels and preprocessing"
            )
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MetadataError(f"{source}: {METADATA_KEY!r} metadata is not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise MetadataError(f"{source}: {METADATA_KEY!r} metadata must be a JSON object")
        return cls._from_dict(raw, source)

    @classmethod
    def _from_dict(cls, raw: dict[str, Any], source: str) -> ModelMetadata:
        missing = sorted({"labels", "input_shape", "mean", "std", "resize_size", "interpolation"} - set(raw))
        if missing:
            raise MetadataError(f"{source}: {METADATA_KEY!r} metadata lacks {missing}")
        labels = raw["labels"]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise MetadataError(f"{source}: 'labels' must be a non-empty list of strings")
        shape = _int_triple(raw["input_shape"], "input_shape", source)
        if shape[0] != 3:
            raise MetadataError(f"{source}: 'input_shape' must be [3, H, W] (RGB), got {list(shape)}")
        mean = _float_triple(raw["mean"], "mean", source)
        std = _float_triple(raw["std"], "std", source)
        if min(std) <= 0:
            raise MetadataError(f"{source}: 'std' must be positive, got {list(std)}")
        resize_size = raw["resize_size"]
        if not isinstance(resize_size, int) or resize_size < 1:
            raise MetadataError(f"{source}: 'resize_size' must be a positive integer, got {resize_size!r}")
        if raw["interpolation"] not in INTERPOLATIONS:
            raise MetadataError(
                f"{source}: 'interpolation' must be one of {INTERPOLATIONS}, got {raw['interpolation']!r}"
            )
        accuracy = raw.get("val_accuracy")
        return cls(
            labels=tuple(labels),
            input_shape=shape,
            mean=mean,
            std=std,
            resize_size=resize_size,
            interpolation=raw["interpolation"],
            backbone=str(raw.get("backbone", "unknown")),
            val_accuracy=float(accuracy) if isinstance(accuracy, int | float) else None,
            created=raw.get("created"),
            raw=raw,
        )


def _int_triple(value: Any, field: str, source: str) -> tuple[int, int, int]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value)):
        raise MetadataError(f"{source}: {field!r} must be three positive integers, got {value!r}")
    return (value[0], value[1], value[2])


def _float_triple(value: Any, field: str, source: str) -> tuple[float, float, float]:
    if not (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int | float) and math.isfinite(v) for v in value)
    ):
        raise MetadataError(f"{source}: {field!r} must be three finite numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))
