"""Real photographs that ship with scikit-image: parity checks need real images, offline."""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import data

SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
"""scikit-image sample photos: a tabby cat, an espresso, a person, a rocket launch."""


def sample_photo(name: str) -> Image.Image:
    """The scikit-image sample `name` (e.g. "chelsea") as an RGB PIL image."""
    array = getattr(data, name)()
    if isinstance(array, tuple):  # stereo samples come as (left, right, disparity)
        array = array[0]
    return Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")


def sample_photos(names: tuple[str, ...] = SAMPLE_PHOTOS) -> list[Image.Image]:
    return [sample_photo(name) for name in names]
