"""The evaluation transform, torch-free: its description (`EvalSpec`) and the one implementation
(`EvalTransform`) training evaluation and serving share.

An RGB image becomes the model's normalized [3, H, W] float32 input the way torchvision's
`Resize(resize_size)` -> `CenterCrop(input_size)` -> `ToTensor()` -> `Normalize(mean, std)` does it,
with two shortcuts that keep the result within rounding of that pipeline:
- only the pixels the center crop keeps are resampled: Pillow resizes the matching source box
  straight to the crop size, with the same filter scale and pixel centers as the full resize (about
  half the resampling work; a pixel here and there lands one grey level away; nearest-neighbour
  resizing, cheap anyway, is done in full so no pixel choice can flip). It does so in two bands of
  rows (`EvalTransform.bands`), which two threads may share for one image with the same result;
- conversion and normalization are one table lookup per channel (`(v / 255 - mean) / std` computed
  in float32 for all 256 values), bit-identical to ToTensor + Normalize and ~6x cheaper.
When the resized image is smaller than the crop, CenterCrop's zero padding is reproduced exactly.

A model exported with uint8 input (`input_dtype` "uint8" in its metadata) normalizes inside its graph:
for it the transform stops before the lookup and writes the cropped pixels as [3, H, W] uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
"""Resize filters a model may name. They are also the values of torchvision's `InterpolationMode`, so
training builds its torchvision transforms with `InterpolationMode(name)` and needs no map of its own."""
_FILTERS = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
_RESAMPLE = dict(zip(INTERPOLATIONS, _FILTERS, strict=True))
FLOAT32 = "float32"
"""Input dtype of a graph that takes the normalized rows: the transform's lookup table makes them."""
UINT8 = "uint8"
"""Input dtype of a graph that takes the cropped RGB pixels and normalizes them itself."""
INPUT_DTYPES = (FLOAT32, UINT8)
"""What a model's input may hold (metadata `input_dtype`); also the numpy dtype names of its rows."""


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation transform, defined once: what the model's metadata says about preprocessing.

    Applied to an RGB image: resize so the shorter side is `resize_size` (aspect kept, torchvision
    `Resize(int)` semantics), center-crop to `input_size`, scale to [0, 1], normalize with mean/std,
    lay out as CHW float32. Training validates with it; the service rebuilds it from the metadata.
    Sequences are stored as tuples, so a spec read back from JSON compares equal to the original.
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
        for name in ("input_size", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"'interpolation' must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"'input_size' must be two positive integers, got {list(self.input_size)}")
        if self.resize_size < min(self.input_size):
            raise ValueError(
                f"'resize_size' ({self.resize_size}) must be at least the shorter side of the crop "
                f"{list(self.input_size)}"
            )
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name!r} must be three finite numbers (RGB), got {list(values)}")
        if min(self.std) <= 0:
            raise ValueError(f"'std' must be positive, got {list(self.std)}")

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): the region of a `width` x `height` image that the model's input shows.

        The center crop of the resized image, mapped back through the resize's scale on each axis,
        in the image's own pixels. Where the resized image is smaller than the crop (zero padding),
        the box reaches past the image's edges.
        """
        resized = resized_size(width, height, self.resize_size)
        top, left = crop_offsets(resized, self.input_size)
        scale_x, scale_y = width / resized[0], height / resized[1]
        crop_height, crop_width = self.input_size
        return (
            left * scale_x,
            top * scale_y,
            (left + crop_width) * scale_x,
            (top + crop_height) * scale_y,
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
    """PIL RGB image -> the model's [3, H, W] input row, as the model's metadata describes it: normalized
    float32, or (`input_dtype` "uint8") the cropped pixels, which the model's graph normalizes."""

    input_size: tuple[int, int]
    """(height, width) of the model input."""
    resize_size: int
    """The shorter side is resized to this before the center crop."""
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_dtype: str = FLOAT32
    """The rows' dtype: one of `INPUT_DTYPES` (the model metadata's `input_dtype`)."""
    _table: np.ndarray = field(init=False, repr=False, compare=False)

    @classmethod
    def from_spec(cls, spec: EvalSpec, input_dtype: str = FLOAT32) -> EvalTransform:
        """The transform `spec` describes; serving passes the `eval_spec` and `input_dtype` of the model's
        metadata."""
        return cls(spec.input_size, spec.resize_size, spec.interpolation, spec.mean, spec.std, input_dtype)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.input_dtype not in INPUT_DTYPES:
            raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}, got {self.input_dtype!r}")
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
        rows: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The model input for `image` (mode RGB), written into `out` ([3, H, W] of `input_dtype`) when
        given.

        `source_size` is the (width, height) of the picture `image` was decoded from at reduced size
        (a JPEG's DCT scaling divides both sides by a power of two and rounds up): the resize and crop
        are then laid out on the full picture, as for a full decode, and only sampled from `image`.
        `rows`, one of `bands`, writes only that band of the input, so that two threads can each
        write one band of an image's row; the rest of `out` is left as it was.
        """
        if image.mode != "RGB":
            raise ValueError(f"EvalTransform needs an RGB image, got mode {image.mode!r}")
        height, width = self.input_size
        if out is None:
            out = np.empty((3, height, width), dtype=self.input_dtype)
        elif out.dtype != self.input_dtype:
            raise ValueError(f"this transform writes {self.input_dtype} rows, got an {out.dtype} array")
        # Band by band when resampling (None: the whole crop at once, a cut that needs no bands).
        pieces = [rows] if rows or not self.resamples(image, source_size) else list(self.bands)
        for piece in pieces:
            start, stop = piece or (0, height)
            pixels = self.crop(image, source_size, piece)
            band = out[:, start:stop]
            if self.input_dtype == UINT8:  # the graph normalizes: HWC -> CHW is all that is left
                np.copyto(band, pixels.transpose(2, 0, 1))
                continue
            for channel in range(3):
                np.take(self._table[channel], pixels[:, :, channel], out=band[channel])
        return out

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """[..., 3, H, W] uint8 pixels -> the float32 rows a float32 model takes: what a uint8 model's
        graph computes from the same pixels (within rounding), by this transform's lookup table."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim < 3 or pixels.shape[-3] != 3:
            raise ValueError(f"expected uint8 pixels [..., 3, H, W], got {pixels.dtype} {list(pixels.shape)}")
        rows = np.empty(pixels.shape, dtype=np.float32)
        for channel in range(3):
            np.take(self._table[channel], pixels[..., channel, :, :], out=rows[..., channel, :, :])
        return rows

    @property
    def bands(self) -> tuple[tuple[int, int], ...]:
        """The (start, stop) row ranges of the input that `crop` resamples each on its own: the upper
        half and the lower half (one band for a one-row input).

        A band is resampled from its own box of the source, laid out with the whole crop's scale and
        pixel centres, so its pixels are the same whichever thread computes it and whenever: a lone
        image's two threads and one thread among many images write the same row, bit for bit. (One
        box for the whole crop would differ from the bands in a rare pixel by one grey level, where a
        band's box rounds differently in the last bit.)
        """
        height = self.input_size[0]
        return ((0, height),) if height < 2 else ((0, height // 2), (height // 2, height))

    def crop(
        self,
        image: Image.Image,
        source_size: tuple[int, int] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The resized, center-cropped image as an HxWx3 uint8 array (before normalization); with `rows`,
        one of `bands`, only that band of it."""
        height, width = self.input_size
        if rows is not None and rows not in self.bands:
            raise ValueError(f"rows must be one of the bands {list(self.bands)}, got {rows}")
        start, stop = rows or (0, height)
        source = source_size or image.size
        size = resized_size(*source, self.resize_size)
        if size[0] < width or size[1] < height:
            return self._padded(image, resized_size(*image.size, self.resize_size))[start:stop]
        top, left = crop_offsets(size, self.input_size)
        if size == image.size:
            return np.asarray(image)[top + start : top + stop, left : left + width]
        if self.interpolation == "nearest":
            # Which source pixel is nearest can flip with the box's rounding; nearest is cheap in full.
            size = resized_size(*image.size, self.resize_size)
            top, left = crop_offsets(size, self.input_size)
            resized = np.asarray(image.resize(size, _RESAMPLE["nearest"]))
            return resized[top + start : top + stop, left : left + width]
        # A reduced decode by r has pixel i covering source pixels [r*i, r*(i+1)): divide by r exactly.
        reduction = round(max(source) / max(image.size)) if source_size else 1
        scale_x, scale_y = source[0] / size[0] / reduction, source[1] / size[1] / reduction
        parts = [
            np.asarray(
                image.resize(
                    (width, band_stop - band_start),
                    _RESAMPLE[self.interpolation],
                    box=(
                        left * scale_x,
                        (top + band_start) * scale_y,
                        (left + width) * scale_x,
                        (top + band_stop) * scale_y,
                    ),
                )
            )
            for band_start, band_stop in ([rows] if rows else self.bands)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def resamples(self, image: Image.Image, source_size: tuple[int, int] | None = None) -> bool:
        """Whether `crop` resamples `image` (a filter over a box of it, the bulk of the transform's
        time, which its bands share), rather than cutting out, padding or nearest-resizing it."""
        height, width = self.input_size
        size = resized_size(*(source_size or image.size), self.resize_size)
        fits = size[0] >= width and size[1] >= height
        return fits and size != image.size and self.interpolation != "nearest"

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
