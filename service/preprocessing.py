"""Image bytes -> the model's input tensor, rebuilt from the model metadata with PIL and numpy only.

It reproduces the training eval transform (torchvision `Resize(resize_size)` -> `CenterCrop` ->
`ToTensor` -> `Normalize`) operation for operation, so a PIL image gives the same floats as in
training (tests/service/test_preprocessing.py proves it on real photos). On top of that, for any
uploaded file, its cost is bounded before it is paid, from the header alone:
- the declared area must fit `max_pixels` (decompression bombs);
- the aspect ratio must fit `MAX_ASPECT_RATIO`: the resize output is `resize_size`² times the ratio,
  so the cap bounds it (a 4000x1 strip would otherwise become 1,024,000x256), and no model can use
  the 5 % of such a strip that its center crop keeps;
- JPEGs are decoded at reduced size when the target is much smaller (DCT scaling, Pillow's draft
  mode), and the pixels that will really be decoded must fit `max_decoded_pixels` (PNG, WebP, BMP
  and GIF have no reduced decoding and pay for every pixel).
Then EXIF orientation, and conversion of grayscale, palette, RGBA, CMYK and 16-bit images to 8-bit RGB.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInputError
from service.metadata import ModelMetadata

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 40_000_000
"""Largest accepted declared image area in pixels (8000x5000), checked from the header before decoding."""
# 2048x2048: a PNG of that size decodes in ~90 ms on one core here (zlib), ten times a 2-MP JPEG
# decoded with DCT scaling; a JPEG only reaches it when it declares more than 64x that area.
MAX_DECODED_PIXELS = 4_194_304
"""Largest area actually decoded, in pixels: after draft reduction for JPEGs, the full size otherwise."""
MAX_ASPECT_RATIO = 20.0
"""Largest longer-side / shorter-side ratio accepted."""
# Pillow opens multi-picture JPEGs (phone cameras) through "JPEG" and reports their format as "MPO".
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's `Resize(int)` rule: shorter side -> `shorter`, longer int(shorter * long / short)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's `CenterCrop` on an HxWxC array, zero-padding first when the image is smaller."""
    h, w = pixels.shape[:2]
    if height > h or width > w:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = pixels.shape[:2]
    top, left = round((h - height) / 2.0), round((w - width) / 2.0)
    return pixels[top : top + height, left : left + width]


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
    """The eval transform of one model; call it with encoded image bytes, get a [3, H, W] float32 array."""

    input_size: tuple[int, int]
    """(height, width) of the model input."""
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    use_draft: bool = True
    """Decode large JPEGs at a reduced size (DCT scaling) when it still covers `resize_size`."""
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
        return cls(
            input_size=(height, width),
            resize_size=metadata.resize_size,
            interpolation=metadata.interpolation,
            mean=metadata.mean,
            std=metadata.std,
            use_draft=use_draft,
            max_pixels=max_pixels,
            max_decoded_pixels=max_decoded_pixels,
        )

    def __call__(self, data: bytes, name: str = "image") -> np.ndarray:
        """Decode and transform one image; blocking, call it from a worker thread."""
        return self.transform(self.decode(data, name))

    def decode(self, data: bytes, name: str = "image") -> Image.Image:
        """Bytes -> upright 8-bit RGB PIL image; `InvalidInputError` naming `name` if it cannot be."""
        if not data:
            raise InvalidInputError(
                f"{name}: the file is empty (0 bytes); send a JPEG, PNG, WebP, BMP or GIF"
            )
        image = self._open(data, name)
        if self.use_draft and image.format in ("JPEG", "MPO"):
            target = max(self.resize_size, *self.input_size)
            image.draft("RGB", (target, target))
        self._check_decoded_size(image, name)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidInputError(
                f"{name}: the {image.format} data is truncated or corrupt ({exc})"
            ) from exc
        return to_rgb(self._upright(image, name))

    def transform(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> normalized [3, H, W] float32, exactly as the training eval transform."""
        width, height = image.size
        size = resized_size(width, height, self.resize_size)
        if size != image.size:
            image = image.resize(size, _RESAMPLE[self.interpolation])
        pixels = center_crop(np.asarray(image, dtype=np.uint8), *self.input_size)
        chw = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return np.ascontiguousarray((chw - mean) / std)

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
            raise InvalidInputError(
                f"{name}: {width}x{height} has an aspect ratio beyond {MAX_ASPECT_RATIO:g}:1, which the "
                f"model's {self.input_size[1]}x{self.input_size[0]} center crop cannot use; crop the region "
                "of interest before sending it"
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
            return ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError, KeyError, TypeError) as exc:  # malformed EXIF blocks
            logger.debug("%s: ignoring unreadable EXIF orientation (%s)", name, exc)
            return image
