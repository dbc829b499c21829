"""Real photographs for the training tests (shipped with scikit-image, no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modelcontract import EvalSpec
from training.photos import sample_photo
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


def write_image_folder(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """DIR/<class>/*.jpg of real photo crops: "cat" (chelsea), "coffee", "person" (astronaut)."""
    rng = np.random.default_rng(seed)
    for label, name in zip(TINY_LABELS, ("chelsea", "coffee", "astronaut"), strict=True):
        source = photo(name)
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            scale = rng.uniform(0.6, 0.95)
            width, height = int(source.width * scale), int(source.height * scale)
            left = int(rng.integers(0, source.width - width + 1))
            top = int(rng.integers(0, source.height - height + 1))
            crop = source.crop((left, top, left + width, top + height)).resize((96, 72))
            crop.save(folder / f"{name}_{index}.jpg", quality=90)
    return root
