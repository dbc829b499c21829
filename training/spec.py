"""The model contract shared by training and serving, with no torch import.

A model in the repository is `models/<name>/<version>/model.onnx`. Its ONNX `metadata_props` hold one
key, `convserve`, whose value is the JSON of `ModelMetadata`-like dict built here. The service reads it
back with its own torch-free code (`service.models.repository`), so every field here is plain JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from modelcontract import INTERPOLATIONS

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ONNX_OPSET = 18


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation transform, defined once.

    Applied to an RGB image: resize so the shorter side is `resize_size` (aspect kept, torchvision
    `Resize(int)` semantics), center-crop to `input_size`, scale to [0, 1], normalize with mean/std,
    lay out as CHW float32. Training validates with it; the service rebuilds it from the metadata.
    """

    input_size: tuple[int, int]
    """(height, width) in pixels after the center crop: the model's input H and W."""
    resize_size: int
    """Length in pixels of the shorter image side after resizing, before the crop."""
    interpolation: str
    """Resampling filter for the resize: one of `INTERPOLATIONS`."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted after scaling to [0, 1] (RGB order)."""
    std: tuple[float, float, float]
    """Per-channel standard deviation divided by after subtracting the mean (RGB order)."""

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if min(self.input_size) < 1 or self.resize_size < min(self.input_size):
            raise ValueError(
                f"resize_size ({self.resize_size}) must be at least the crop size {self.input_size}"
            )

    @classmethod
    def from_crop_pct(
        cls,
        image_size: int,
        crop_pct: float,
        interpolation: str,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> EvalSpec:
        """timm's convention: resize to floor(image_size / crop_pct), then crop `image_size`."""
        return cls(
            input_size=(image_size, image_size),
            resize_size=int(image_size / crop_pct),
            interpolation=interpolation,
            mean=mean,
            std=std,
        )

    def to_metadata(self) -> dict[str, Any]:
        """The transform's fields as they appear in the `convserve` metadata JSON."""
        fields = asdict(self)
        return {
            "input_shape": [3, *fields.pop("input_size")],
            "resize_size": fields["resize_size"],
            "interpolation": fields["interpolation"],
            "mean": list(fields["mean"]),
            "std": list(fields["std"]),
        }
