"""Backbone factory: every architecture becomes `Classifier(base, head)` with ordered block groups.

The same shape for every network lets freezing, unfreezing, export and the tests treat LeNet-5 and
EfficientNet-Lite0 alike. `base` maps images to features (a feature map or, for LeNet-5, a vector),
`head` is the new classifier (global pool -> dropout -> linear), and `block_groups` lists the base's
modules from the input (bottom) to the output (top), so "unfreeze the top N groups" is well defined.

Which names come from where: `lenet5` and `zfnet` are defined here (trained from scratch); `alexnet`,
`vgg16` and `googlenet` come from torchvision (timm has no AlexNet/GoogLeNet, and its VGG replaces
the FC layers by convolutions); any other name is a timm model (e.g. `efficientnet_lite0`, `resnet50`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.lenet import LeNet5Features
from training.torchvision_bases import TORCHVISION_BASES
from training.zfnet import MIN_IMAGE_SIZE as ZFNET_MIN_IMAGE_SIZE
from training.zfnet import ZFNetFeatures

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"
# Our `efficientnet_lite0` is the architecture its packaged TF-converted weights need: TF "SAME"
# padding and BatchNorm eps 1e-3, i.e. timm's `tf_` variant (evidence: tests/training/test_pretrained.py).
TIMM_ALIASES = {"efficientnet_lite0": "tf_efficientnet_lite0"}
DEFAULT_DROP_RATE = 0.2
_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


class ClassifierHead(nn.Module):
    """Global average pool (for feature maps) -> dropout -> linear, the Keras transfer-learning head."""

    def __init__(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(drop_rate)
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:
            features = features.mean(dim=(2, 3))
        return self.linear(self.dropout(features))


class Classifier(nn.Module):
    """A base network, its block groups (bottom to top) and a new classification head.

    `freeze_batchnorm=True` keeps every BatchNorm layer of the base in inference mode even after
    `model.train()`: their running statistics never move and they normalize with the pretrained
    statistics. That is what "frozen" must mean for a pretrained base (Keras calls the base with
    `training=False`); a plain `requires_grad=False` would still update the running statistics.
    """

    def __init__(
        self,
        base: nn.Module,
        num_features: int,
        num_classes: int,
        block_groups: Sequence[Sequence[str]],
        *,
        drop_rate: float = DEFAULT_DROP_RATE,
        freeze_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.base = base
        self.head = ClassifierHead(num_features, num_classes, drop_rate)
        self.block_groups: list[list[str]] = [list(group) for group in block_groups]
        self.freeze_batchnorm = freeze_batchnorm
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(images))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode and self.freeze_batchnorm:
            for module in self.base.modules():
                if isinstance(module, _BATCHNORM_TYPES):
                    module.eval()
        return self


@dataclass(frozen=True)
class BackboneDefaults:
    """The data contract a backbone was pretrained with (timm's pretrained_cfg in small)."""

    image_size: int
    """Side of the square network input in pixels."""
    crop_pct: float
    """Fraction of the resized image kept by the center crop (resize = image_size / crop_pct)."""
    interpolation: str
    """Resampling filter of the eval resize."""
    mean: tuple[float, float, float]
    """Per-channel RGB mean the pretrained weights expect after scaling to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel RGB standard deviation the pretrained weights expect."""
    min_image_size: int = 32
    """Smallest input side in pixels the architecture accepts (its pooling needs enough to pool)."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

_TORCHVISION_DEFAULTS = {
    # Below 63 px AlexNet's last 3x3 max pool has less than 3x3 to pool.
    "alexnet": BackboneDefaults(224, 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD, min_image_size=63),
    "vgg16": BackboneDefaults(224, 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
    # torchvision's GoogLeNet weights were trained on (x - 0.5) / 0.5 (its transform_input undoes
    # ImageNet normalization); we normalize that way directly.
    "googlenet": BackboneDefaults(224, 0.875, "bilinear", HALF, HALF),
}

# Architectures defined here and trained from scratch: no weights for them exist offline.
SCRATCH_BASES: dict[str, type[LeNet5Features | ZFNetFeatures]] = {
    "lenet5": LeNet5Features,
    "zfnet": ZFNetFeatures,
}
_SCRATCH_DEFAULTS = {
    "lenet5": BackboneDefaults(32, 1.0, "bilinear", HALF, HALF),
    # The paper's 224 px crops; ImageNet statistics stand in for its per-pixel mean image.
    "zfnet": BackboneDefaults(
        224, 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD, min_image_size=ZFNET_MIN_IMAGE_SIZE
    ),
}


def _build_scratch(name: str, num_classes: int, drop_rate: float) -> Classifier:
    base = SCRATCH_BASES[name]()
    return Classifier(
        base,
        base.num_features,
        num_classes,
        base.block_groups,
        drop_rate=drop_rate,
        # Trained from scratch: there are no pretrained statistics to protect (and neither has BN).
        freeze_batchnorm=False,
    )


def _build_torchvision(name: str) -> Callable[[int, float], Classifier]:
    def build(num_classes: int, drop_rate: float) -> Classifier:
        base, num_features, groups = TORCHVISION_BASES[name]()
        return Classifier(base, num_features, num_classes, groups, drop_rate=drop_rate)

    return build


def _build_timm(name: str, num_classes: int, drop_rate: float) -> Classifier:
    import timm
    from timm.models import group_modules

    if not timm.is_model(name):
        raise ValueError(
            f"unknown backbone {name!r}: use one of {known_backbones()} or a timm model name "
            "(see timm.list_models())"
        )
    # num_classes=0 and global_pool="" make the timm model return its final feature map; the timm
    # dropout is off because our head has its own.
    base: Any = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", drop_rate=0.0)
    if hasattr(base, "group_matcher"):
        # timm's own layer grouping (stem, then each stage), the one its layer-wise LR decay uses.
        grouped = group_modules(base, base.group_matcher(coarse=True))
        groups = [grouped[key] for key in sorted(grouped)]
    else:
        groups = [[name] for name, child in base.named_children() if any(child.parameters())]
    return Classifier(base, int(base.num_features), num_classes, groups, drop_rate=drop_rate)


def known_backbones() -> list[str]:
    """Names handled here rather than passed on to timm."""
    return sorted([*SCRATCH_BASES, *TORCHVISION_BASES])


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    *,
    weights: Path | None = None,
    drop_rate: float = DEFAULT_DROP_RATE,
    freeze_batchnorm: bool | None = None,
) -> Classifier:
    """Build backbone `name` with a new `num_classes` head.

    `pretrained=True` fills the base from `weights` (a state dict file) or, without it, from the
    offline source `training.pretrained.load_pretrained` finds (never the network). BatchNorm is kept
    in inference mode when the base is pretrained (`freeze_batchnorm=None` follows `pretrained`):
    a randomly initialized base has no statistics worth protecting.
    """
    key = name.lower()
    if key in SCRATCH_BASES:
        model = _build_scratch(key, num_classes, drop_rate)
    elif key in TORCHVISION_BASES:
        model = _build_torchvision(key)(num_classes, drop_rate)
    else:
        model = _build_timm(TIMM_ALIASES.get(key, name), num_classes, drop_rate)
    if pretrained:
        from training.pretrained import load_pretrained

        load_pretrained(model, key, weights)
    model.freeze_batchnorm = pretrained if freeze_batchnorm is None else freeze_batchnorm
    return model


def backbone_defaults(name: str) -> BackboneDefaults:
    """Input size, crop, interpolation and normalization the backbone's pretrained weights expect."""
    key = name.lower()
    if key in _SCRATCH_DEFAULTS:
        return _SCRATCH_DEFAULTS[key]
    if key in _TORCHVISION_DEFAULTS:
        return _TORCHVISION_DEFAULTS[key]
    if key == DEFAULT_BACKBONE:
        from training.pretrained import EFFICIENTNET_LITE0_DEFAULTS

        return EFFICIENTNET_LITE0_DEFAULTS
    import timm

    config = timm.get_pretrained_cfg(name) or timm.get_pretrained_cfg(name.split(".", maxsplit=1)[0])
    if config is None:
        raise ValueError(f"timm has no pretrained configuration for {name!r}")
    return BackboneDefaults(
        image_size=int(config.input_size[-1]),
        crop_pct=float(config.crop_pct or 0.875),
        interpolation=config.interpolation if config.interpolation in ("bilinear", "bicubic") else "bilinear",
        mean=tuple(float(v) for v in config.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in config.std),  # type: ignore[arg-type]
    )
