"""The benchmark's image corpus: real photos as JPEG bytes of about 0.3 to 2 megapixels.

scikit-image ships a handful of colour photos (the cat, the coffee cup, the astronaut, …) of at most
~0.3 MP, so most are upscaled to reach the sizes users upload from phones and cameras. The corpus is
deterministic: the same photos, sizes and JPEG quality on every run, so runs can be compared.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# scikit-image sample photos that are RGB photographs and ship inside the package (no download).
_PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")

# Target sizes in megapixels. Spread over the range of phone and web uploads, weighted to the middle as
# uploads usually are.
DEFAULT_MEGAPIXELS = (0.3, 0.5, 0.8, 1.0, 1.0, 1.2, 1.5, 2.0)

JPEG_QUALITY = 90


@dataclass(frozen=True)
class Photo:
    """One JPEG as it is uploaded: a file name and the encoded bytes."""

    filename: str
    data: bytes
    width: int
    height: int

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def _sample_photo(name: str) -> np.ndarray:
    # Imported on first use: scikit-image takes about a second to import, and the robustness corpus
    # and the report code import this module without needing a photo.
    import skimage.data  # noqa: PLC0415

    loader: Callable[[], np.ndarray] = getattr(skimage.data, name)
    return loader()


def resize_to_megapixels(image: Image.Image, megapixels: float) -> Image.Image:
    scale = math.sqrt(megapixels * 1e6 / (image.width * image.height))
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """Encode an RGB image as a baseline JPEG, as a phone or camera would."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def build_corpus(megapixels: Sequence[float] = DEFAULT_MEGAPIXELS) -> list[Photo]:
    """One JPEG per entry of `megapixels`, cycling through the sample photos."""
    if not megapixels or min(megapixels) <= 0:
        raise ValueError(f"megapixels must be a non-empty list of positive sizes, got {megapixels!r}")
    photos = []
    for index, size in enumerate(megapixels):
        name = _PHOTO_NAMES[index % len(_PHOTO_NAMES)]
        image = resize_to_megapixels(Image.fromarray(_sample_photo(name)).convert("RGB"), size)
        photos.append(
            Photo(
                filename=f"{name}_{image.width}x{image.height}.jpg",
                data=encode_jpeg(image),
                width=image.width,
                height=image.height,
            )
        )
    return photos


def describe_corpus(photos: Sequence[Photo]) -> dict[str, object]:
    """The corpus as recorded in the results JSON."""
    return {
        "count": len(photos),
        "megapixels_min": round(min(p.megapixels for p in photos), 3),
        "megapixels_max": round(max(p.megapixels for p in photos), 3),
        "megapixels_mean": round(sum(p.megapixels for p in photos) / len(photos), 3),
        "jpeg_kb_mean": round(sum(len(p.data) for p in photos) / len(photos) / 1024, 1),
        "jpeg_quality": JPEG_QUALITY,
        "files": [p.filename for p in photos],
    }
