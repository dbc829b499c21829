"""A tiny real model that can explain its answers: two convolutions and the shared classifier head.

LeNet-5, the service tests' tiny model, flattens its feature map before the head, so it has no
feature map to export. This one keeps an 8x8 map at the tiny model's 32x32 input, so the real exporter
gives it the feature-map output and class activation maps can be checked end to end in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data
from torch import nn

from tests.tinymodel import PARITY_PHOTOS, TINY_LABELS, TINY_SPEC
from training.classifier import Classifier
from training.export import export_onnx
from training.transforms import eval_transform

EXPLAIN_MODEL_NAME = "seeing"
FEATURE_CHANNELS = 8
FEATURE_SIZE = 8
"""The feature map's height and width at the 32x32 input: two stride-2 convolutions."""


def tiny_conv_classifier(num_classes: int, seed: int = 0) -> Classifier:
    """A seeded, untrained two-convolution classifier with an 8x8 feature map at 32x32 input."""
    torch.manual_seed(seed)
    base = nn.Sequential(
        nn.Conv2d(3, FEATURE_CHANNELS, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(FEATURE_CHANNELS, FEATURE_CHANNELS, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    return Classifier(base, FEATURE_CHANNELS, num_classes, [["0", "1"], ["2", "3"]], freeze_batchnorm=False)


def parity_photos() -> torch.Tensor:
    transform = eval_transform(TINY_SPEC)
    photos = [
        Image.fromarray(np.asarray(getattr(skimage_data, name)(), dtype=np.uint8)).convert("RGB")
        for name in PARITY_PHOTOS
    ]
    return torch.stack([transform(photo) for photo in photos])


def export_explainable(version_dir: Path, labels: Sequence[str] = TINY_LABELS, seed: int = 0) -> Path:
    """Export the tiny convolutional classifier to `version_dir/model.onnx` and return that path."""
    export_onnx(
        tiny_conv_classifier(len(labels), seed),
        version_dir,
        labels=labels,
        eval_spec=TINY_SPEC,
        backbone="tiny_conv",
        parity_inputs=parity_photos(),
    )
    return version_dir / "model.onnx"
