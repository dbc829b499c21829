"""Image bytes -> the model's input tensor: a bounded decode, then the training evaluation transform.

The transform is `modelcontract.transform.EvalTransform`, the same object training evaluation runs,
so serving and evaluation agree by construction on a decoded image. What this module adds is the
decode of an uploaded file, whose cost is bounded before it is paid, from the header alone:
- the declared area must fit `max_pixels` (decompression bombs);
- the aspect ratio must fit `MAX_ASPECT_RATIO`: the resize output is `resize_size`² times the ratio,
  so the cap bounds it (a 4000x1 strip would otherwise become 1,024,000x256), and no model can use
  the 5 % of such a strip that its center crop keeps;
- JPEGs are decoded at reduced size when the target is much smaller (DCT scaling, Pillow's draft
  mode, down to `DRAFT_MARGIN` x the resize size), and the pixels that will really be decoded must fit
  `max_decoded_pixels` (PNG, WebP, BMP and GIF have no reduced decoding and pay for every pixel).
Then EXIF orientation, and conversion of grayscale, palette, RGBA, CMYK and 16-bit images to 8-bit RGB.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from modelcontract.transform import EvalTransform
from service.errors import InvalidInputError
from service.metadata import ModelMetadata

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 40_000_000
"""Largest accepted declared image area in pixels (8000x5000), checked from the header before decoding."""
# 2048x2048: a PNG of that size decodes in ~90 ms on one core here (zlib), ten times a 2-MP JPEG
# decoded with DCT scaling; a JPEG only reaches it when it declares more than 64x that area.
MAX_DECODED_PIXELS = 4_194_304
"""Largest area actually decoded, in pixels: after draft reduction for JPEGs, the full size otherwise."""
# How far DCT scaling may shrink a JPEG: to 1.25x the resize size, so the resize filter still does
# real work. Drafting all the way down to the resize size gave a mean absolute difference from a full
# decode of 0.011 (normalized units) on the benchmark photos, 0.028 on the worst; at 1.25x, 0.005 and
# 0.009 (the transform lays out resize and crop on the full picture either way).
DRAFT_MARGIN = 1.25
MAX_ASPECT_RATIO = 20.0
"""Largest longer-side / shorter-side ratio accepted."""
# Pillow opens multi-picture JPEGs (phone cameras) through "JPEG" and reports their format as "MPO".
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow decodes (as torchvision's loader does, alpha is dropped)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I->L conversion clips at 255 instead of scaling, which turns a 16-bit image white.
        scaled = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImagePreprocessor:
    """One model's input from encoded image bytes: bounded decode, then the shared `EvalTransform`."""

    transform: EvalTransform
    use_draft: bool = True
    """Decode large JPEGs at reduced size (DCT scaling) while they stay `DRAFT_MARGIN` x the resize."""
    max_pixels: int = MAX_IMAGE_PIXELS
    max_decoded_pixels: int = MAX_DECODED_PIXELS

    @classmethod
    def from_metadata(
        cls,
        metadata: ModelMetadata,
        use_draft: bool = True,
        max_pixels: int = MAX_IMAGE_PIXELS,
        max_decoded_pixels: int = MAX_DECODED_PIXELS,
    ) -> ImagePreprocessor:
        _, height, width = metadata.input_shape
        transform = EvalTransform(
            input_size=(height, width),
            resize_size=metadata.resize_size,
            interpolation=metadata.interpolation,
            mean=metadata.mean,
            std=metadata.std,
        )
        return cls(transform, use_draft, max_pixels, max_decoded_pixels)

    def __call__(self, data: bytes, name: str = "image", out: np.ndarray | None = None) -> np.ndarray:
        """Decode and transform one image (into `out`, a [3, H, W] float32 row, when given).

        Blocking: call it from a worker thread.
        """
        image, source_size = self._decode(data, name)
        return self.transform(image, out, source_size=source_size)

    def decode(self, data: bytes, name: str = "image") -> Image.Image:
        """Bytes -> upright 8-bit RGB PIL image; `InvalidInputError` naming `name` if it cannot be."""
        return self._decode(data, name)[0]

    def _decode(self, data: bytes, name: str) -> tuple[Image.Image, tuple[int, int] | None]:
        """The upright RGB image, and the upright full size when it was decoded at reduced size."""
        if not data:
            raise InvalidInputError(
                f"{name}: the file is empty (0 bytes); send a JPEG, PNG, WebP, BMP or GIF"
            )
        image = self._open(data, name)
        full_size = image.size
        if self.use_draft and image.format in ("JPEG", "MPO"):
            # draft() picks the strongest 1/2, 1/4 or 1/8 reduction that keeps the shorter side >= target.
            target = math.ceil(DRAFT_MARGIN * max(self.transform.resize_size, *self.transform.input_size))
            image.draft("RGB", (target, target))
        self._check_decoded_size(image, name)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidInputError(
                f"{name}: the {image.format} data is truncated or corrupt ({exc})"
            ) from exc
        decoded_size = image.size
        image = to_rgb(self._upright(image, name))
        if decoded_size == full_size:
            return image, None
        turned = image.size != decoded_size  # EXIF orientation swapped the axes
        return image, (full_size[::-1] if turned else full_size)

    def _open(self, data: bytes, name: str) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise InvalidInputError(f"{name}: {exc}; the limit is {self.max_pixels} pixels") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InvalidInputError(
                f"{name}: not a readable image ({len(data)} bytes); expected one of "
                f"{', '.join(ACCEPTED_FORMATS)}"
            ) from exc
        width, height = image.size
        if width * height > self.max_pixels:
            raise InvalidInputError(
                f"{name}: declared size {width}x{height} ({width * height} pixels) is over the limit of "
                f"{self.max_pixels} pixels; downscale the image before sending it"
            )
        if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
            crop_height, crop_width = self.transform.input_size
            raise InvalidInputError(
                f"{name}: {width}x{height} has an aspect ratio beyond {MAX_ASPECT_RATIO:g}:1, which the "
                f"model's {crop_width}x{crop_height} center crop cannot use; crop the region of interest "
                "before sending it"
            )
        return image

    def _check_decoded_size(self, image: Image.Image, name: str) -> None:
        width, height = image.size  # after draft(): the reduced size a JPEG will really be decoded at
        if width * height > self.max_decoded_pixels:
            raise InvalidInputError(
                f"{name}: decoding this {image.format} would produce {width}x{height} pixels, over the limit "
                f"of {self.max_decoded_pixels} (CONVSERVE_MAX_DECODED_PIXELS); downscale it, or send a JPEG, "
                "which is decoded at reduced size"
            )

    @staticmethod
    def _upright(image: Image.Image, name: str) -> Image.Image:
        try:
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is no rotation
        except (OSError, ValueError, SyntaxError, KeyError, TypeError) as exc:  # malformed EXIF blocks
            logger.debug("%s: ignoring unreadable EXIF orientation (%s)", name, exc)
        return image
