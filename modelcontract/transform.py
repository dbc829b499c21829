"""The evaluation transform, torch-free: the one implementation training evaluation and serving share.

An RGB image becomes the model's normalized [3, H, W] float32 input the way torchvision's
`Resize(resize_size)` -> `CenterCrop(input_size)` -> `ToTensor()` -> `Normalize(mean, std)` does it,
with two shortcuts that keep the result within rounding of that pipeline:
- only the pixels the center crop keeps are resampled: Pillow resizes the matching source box
  straight to the crop size, with the same filter scale and pixel centers as the full resize (about
  half the resampling work; a pixel here and there lands one grey level away; nearest-neighbour
  resizing, cheap anyway, is done in full so no pixel choice can flip);
- conversion and normalization are one table lookup per channel (`(v / 255 - mean) / std` computed
  in float32 for all 256 values), bit-identical to ToTensor + Normalize and ~6x cheaper.
When the resized image is smaller than the crop, CenterCrop's zero padding is reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from modelcontract import INTERPOLATIONS

_FILTERS = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
_RESAMPLE = dict(zip(INTERPOLATIONS, _FILTERS, strict=True))


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's `Resize(int)` rule: shorter side -> `shorter`, longer int(shorter * long / short)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def crop_offsets(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of torchvision's `CenterCrop`: `crop` is (height, width), `size` (width, height)."""
    width, height = size
    return round((height - crop[0]) / 2.0), round((width - crop[1]) / 2.0)


@dataclass(frozen=True)
class EvalTransform:
    """PIL RGB image -> normalized [3, H, W] float32 array, as the model's metadata describes it."""

    input_size: tuple[int, int]
    """(height, width) of the model input."""
    resize_size: int
    """The shorter side is resized to this before the center crop."""
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    _table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        values = np.arange(256, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        object.__setattr__(self, "_table", (values[None, :] - mean) / std)

    def __call__(
        self,
        image: Image.Image,
        out: np.ndarray | None = None,
        *,
        source_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The model input for `image` (mode RGB), written into `out` ([3, H, W] float32) when given.

        `source_size` is the (width, height) of the picture `image` was decoded from at reduced size
        (a JPEG's DCT scaling divides both sides by a power of two and rounds up): the resize and crop
        are then laid out on the full picture, as for a full decode, and only sampled from `image`.
        """
        if image.mode != "RGB":
            raise ValueError(f"EvalTransform needs an RGB image, got mode {image.mode!r}")
        height, width = self.input_size
        if out is None:
            out = np.empty((3, height, width), dtype=np.float32)
        pixels = self.crop(image, source_size)
        for channel in range(3):
            np.take(self._table[channel], pixels[:, :, channel], out=out[channel])
        return out

    def crop(self, image: Image.Image, source_size: tuple[int, int] | None = None) -> np.ndarray:
        """The resized, center-cropped image as an HxWx3 uint8 array (before normalization)."""
        height, width = self.input_size
        source = source_size or image.size
        size = resized_size(*source, self.resize_size)
        if size[0] < width or size[1] < height:
            return self._padded(image, resized_size(*image.size, self.resize_size))
        top, left = crop_offsets(size, self.input_size)
        if size == image.size:
            return np.asarray(image)[top : top + height, left : left + width]
        if self.interpolation == "nearest":
            # Which source pixel is nearest can flip with the box's rounding; nearest is cheap in full.
            size = resized_size(*image.size, self.resize_size)
            top, left = crop_offsets(size, self.input_size)
            resized = np.asarray(image.resize(size, _RESAMPLE["nearest"]))
            return resized[top : top + height, left : left + width]
        # A reduced decode by r has pixel i covering source pixels [r*i, r*(i+1)): divide by r exactly.
        reduction = round(max(source) / max(image.size)) if source_size else 1
        scale_x, scale_y = source[0] / size[0] / reduction, source[1] / size[1] / reduction
        box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
        return np.asarray(image.resize((width, height), _RESAMPLE[self.interpolation], box=box))

    def _padded(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """CenterCrop of an image smaller than the crop: zero padding first (rare, so no shortcut)."""
        if size != image.size:
            image = image.resize(size, _RESAMPLE[self.interpolation])
        pixels = np.asarray(image)
        height, width = self.input_size
        pad_h, pad_w = max(height - size[1], 0), max(width - size[0], 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        top, left = crop_offsets((pixels.shape[1], pixels.shape[0]), self.input_size)
        return pixels[top : top + height, left : left + width]
