"""What each backbone expects of its input: the data contract its pretrained weights were trained with.

Torch-free, so the CLI can name the default backbone without importing torch, and both the model
factory (`training.backbones`) and the weight loader (`training.pretrained`) can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BACKBONE = "efficientnet_lite0"
# Our `efficientnet_lite0` is the architecture its packaged TF-converted weights need: TF "SAME"
# padding and BatchNorm eps 1e-3, i.e. timm's `tf_` variant (evidence: tests/training/test_pretrained.py).
TIMM_ALIASES = {"efficientnet_lite0": "tf_efficientnet_lite0"}
ZFNET_MIN_IMAGE_SIZE = 63
"""Smallest ZFNet input side in pixels: below it layer 5's 3x3 max pool has less than 3x3 to pool."""
SCRATCH_BACKBONES = ("lenet5", "zfnet")
"""Architectures defined here and trained from scratch: no weights for them exist offline."""


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

# Inputs normalized with mean = std = 0.5, the TF-Lite recipe's 127/128 (evidence:
# tests/training/test_pretrained.py).
EFFICIENTNET_LITE0_DEFAULTS = BackboneDefaults(
    image_size=224, crop_pct=0.875, interpolation="bicubic", mean=HALF, std=HALF
)
_SCRATCH_DEFAULTS = {
    "lenet5": BackboneDefaults(32, 1.0, "bilinear", HALF, HALF),
    # The paper's 224 px crops; ImageNet statistics stand in for its per-pixel mean image.
    "zfnet": BackboneDefaults(
        224, 0.875, "bilinear", IMAGENET_MEAN, IMAGENET_STD, min_image_size=ZFNET_MIN_IMAGE_SIZE
    ),
}


def backbone_defaults(name: str) -> BackboneDefaults:
    """Input size, crop, interpolation and normalization the backbone's pretrained weights expect."""
    key = name.lower()
    if key in _SCRATCH_DEFAULTS:
        return _SCRATCH_DEFAULTS[key]
    if key in _TORCHVISION_DEFAULTS:
        return _TORCHVISION_DEFAULTS[key]
    if key == DEFAULT_BACKBONE:
        return EFFICIENTNET_LITE0_DEFAULTS
    import timm  # noqa: PLC0415 (imports torch, ~4 s: only timm-named backbones need it)

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
