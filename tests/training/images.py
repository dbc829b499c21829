"""Real photographs for the training tests (shipped with scikit-image, no download)."""

from __future__ import annotations

import torch
from PIL import Image

from training.photos import sample_photo
from training.spec import EvalSpec
from training.transforms import eval_transform

PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field")
TINY_LABELS = ("cat", "coffee", "person")


def photo(name: str) -> Image.Image:
    """A real RGB photograph from scikit-image by function name (e.g. "chelsea", a tabby cat)."""
    return sample_photo(name)


def preprocess(images: list[Image.Image], spec: EvalSpec) -> torch.Tensor:
    """The training eval transform applied to each image, stacked into [N, 3, H, W]."""
    transform = eval_transform(spec)
    return torch.stack([transform(image) for image in images])
