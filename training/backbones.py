"""Backbone factory: every architecture becomes a `training.classifier.Classifier` with ordered block
groups, filled with pretrained weights by `training.pretrained` when asked.

Dependencies run one way: this module uses `pretrained` (weights) and `backbone_defaults` (the input
contract of each backbone); neither of them imports the factory.

Which names come from where: `lenet5` and `zfnet` are defined here (trained from scratch); `alexnet`,
`vgg16` and `googlenet` come from torchvision (timm has no AlexNet/GoogLeNet, and its VGG replaces
the FC layers by convolutions); any other name is a timm model (e.g. `efficientnet_lite0`, `resnet50`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.backbone_defaults import SCRATCH_BACKBONES, TIMM_ALIASES
from training.classifier import DEFAULT_DROP_RATE, Classifier
from training.lenet import LeNet5Features
from training.pretrained import WeightsUnavailableError, load_pretrained
from training.torchvision_bases import TORCHVISION_BASES
from training.zfnet import ZFNetFeatures

logger = logging.getLogger(__name__)

SCRATCH_BASES: dict[str, type[LeNet5Features | ZFNetFeatures]] = {
    "lenet5": LeNet5Features,
    "zfnet": ZFNetFeatures,
}
"""The architectures of `SCRATCH_BACKBONES`, defined here."""


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
    # timm costs ~1 s on top of torch; only timm-named backbones need it.
    import timm  # noqa: PLC0415
    from timm.models import group_modules  # noqa: PLC0415

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
        if weights is None and key in SCRATCH_BACKBONES:
            raise WeightsUnavailableError(f"{key} has no pretrained weights: train it with --no-pretrained")
        load_pretrained(model, key, weights)
    model.freeze_batchnorm = pretrained if freeze_batchnorm is None else freeze_batchnorm
    return model
