"""The images an INT8 variant is calibrated on and compared with FP32 on, preprocessed for the model.

Two sources:
- a dataset (an image folder or demo:digits; by default the one in the version's `config.json`):
  calibrate on training images, compare top-1 accuracy on the validation split;
- `PHOTOS` (the ImageNet default model has no validation set here): calibrate on random crops of
  scikit-image's sample photos, compare top-1 *agreement* of FP32 and INT8 on fixed views of them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from modelcontract import EvalSpec
from training.data import ImageDataset, load_dataset
from training.photos import sample_photos
from training.transforms import eval_transform

PHOTOS = "skimage:photos"
"""`--calibration` value for scikit-image's sample photos (the default without a dataset)."""
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
"""The colour photographs scikit-image ships (no download)."""


@dataclass(frozen=True)
class CheckImages:
    """Preprocessed images: what calibrates the quantizer and what FP32 and INT8 are compared on."""

    source: str
    calibration: np.ndarray
    evaluation: np.ndarray
    labels: np.ndarray | None
    """Class indices of `evaluation`, or None when only agreement can be measured (photos)."""


def _photo_views(photo: Image.Image) -> list[Image.Image]:
    """Fixed views of a photo: whole, mirrored, four corner crops and a close centre crop."""
    w, h = photo.size
    cw, ch = int(w * 0.75), int(h * 0.75)
    corners = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)]
    views = [photo, ImageOps.mirror(photo)]
    views += [photo.crop((x, y, x + cw, y + ch)) for x, y in corners]
    views.append(photo.crop((w // 5, h // 5, w - w // 5, h - h // 5)))
    return views


def _random_crop(photo: Image.Image, rng: random.Random) -> Image.Image:
    w, h = photo.size
    scale = rng.uniform(0.5, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = photo.crop((x, y, x + cw, y + ch))
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def _stack(images: list[Image.Image], spec: EvalSpec) -> np.ndarray:
    transform = eval_transform(spec)
    return np.stack([np.asarray(transform(image.convert("RGB"))) for image in images])


def photo_images(spec: EvalSpec, count: int, seed: int) -> CheckImages:
    """`count` random crops of the sample photos to calibrate; fixed views of them to compare on."""
    photos = sample_photos(PHOTO_NAMES)
    rng = random.Random(seed)
    crops = [_random_crop(rng.choice(photos), rng) for _ in range(count)]
    views = [view for photo in photos for view in _photo_views(photo)]
    return CheckImages(PHOTOS, _stack(crops, spec), _stack(views, spec), None)


def dataset_images(data: str, spec: EvalSpec, count: int, seed: int, run: dict[str, Any]) -> CheckImages:
    """`count` training images (a seeded sample) to calibrate; the whole validation split to compare on.

    `run` is the `config.json` of the run that trained the model: its split is reproduced."""
    dataset = load_dataset(data, run.get("val_split", 0.2), run.get("seed", 0))
    transform = eval_transform(spec)
    train = list(dataset.train)
    random.Random(seed).shuffle(train)
    calibration = ImageDataset(train[:count], transform, dataset.skipped)
    val = ImageDataset(dataset.val, transform, dataset.skipped)
    return CheckImages(
        data,
        np.stack([np.asarray(calibration[i][0]) for i in range(len(calibration))]),
        np.stack([np.asarray(val[i][0]) for i in range(len(val))]),
        np.array([label for _, label in dataset.val]),
    )


def check_images(
    version_dir: Path, spec: EvalSpec, calibration: str | None, count: int, seed: int
) -> CheckImages:
    """The images named by `--calibration` (`calibration`), by default the dataset the version was
    trained on, else `PHOTOS`; `count` of them calibrate, sampled with `seed`."""
    config_path = version_dir / "config.json"
    run = json.loads(config_path.read_text()) if config_path.is_file() else {}
    data = calibration or run.get("data") or PHOTOS
    if data == PHOTOS:
        return photo_images(spec, count, seed)
    if calibration is not None and data != run.get("data"):
        run = {}  # another dataset: its split is not the run's, use the defaults
    return dataset_images(data, spec, count, seed, run)
