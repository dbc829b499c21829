"""Real photographs (shipped with scikit-image, no download) encoded the ways clients send them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from skimage import data as skimage_data


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo as an RGB PIL image ("chelsea" is a tabby cat, "coffee" a cup)."""
    pixels = getattr(skimage_data, name)()
    return Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(name: str, quality: int = 90) -> bytes:
    return encode(photo(name), "JPEG", quality=quality)


def large_jpeg(name: str, long_side: int = 1600) -> bytes:
    """The photo upscaled to ~1-2 megapixels, the size of a phone upload, as JPEG."""
    image = photo(name)
    scale = long_side / max(image.size)
    resized = image.resize(
        (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
    )
    return encode(resized, "JPEG", quality=90)
