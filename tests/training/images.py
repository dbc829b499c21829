"""Real photographs for the training tests (shipped with scikit-image, no download)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data

from training.spec import EvalSpec
from training.transforms import eval_transform

PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field")
TINY_LABELS = ("cat", "coffee", "person")


def photo(name: str) -> Image.Image:
    """A real RGB photograph from scikit-image by function name (e.g. "chelsea", a tabby cat)."""
    array = getattr(skimage_data, name)()
    if isinstance(array, tuple):  # stereo pairs come as (left, right, disparity)
        array = array[0]
    return Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")


def preprocess(images: list[Image.Image], spec: EvalSpec) -> torch.Tensor:
    """The training eval transform applied to each image, stacked into [N, 3, H, W]."""
    transform = eval_transform(spec)
    return torch.stack([transform(image) for image in images])
