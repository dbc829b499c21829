"""Bases taken from torchvision: AlexNet, VGG16 and GoogLeNet without their classifiers.

Each base keeps torchvision's module names (`features.0`, `inception3a`, ...) so a torchvision
ImageNet state dict loads into it by name with `--weights`; the fully connected classifier is dropped
(Keras' `include_top=False`) and replaced by the shared `ClassifierHead`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn
from torchvision import models

# (base, number of output channels, block groups from input to output)
BaseParts = tuple[nn.Module, int, list[list[str]]]

_GOOGLENET_FEATURES = (
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b",
)  # fmt: skip


def _conv_indices(features: nn.Sequential) -> list[int]:
    return [index for index, layer in enumerate(features) if isinstance(layer, nn.Conv2d)]


def _alexnet() -> BaseParts:
    features = models.alexnet(weights=None).features
    # Five convolutions, one group each: AlexNet is shallow enough that a stage is one layer.
    groups = [[f"features.{index}"] for index in _conv_indices(features)]
    return nn.Sequential(OrderedDict(features=features)), 256, groups


def _vgg16() -> BaseParts:
    features = models.vgg16(weights=None).features
    groups: list[list[str]] = [[]]
    for index, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d):
            groups[-1].append(f"features.{index}")
        elif isinstance(layer, nn.MaxPool2d):
            groups.append([])  # one group per resolution stage, closed by its max pool
    return nn.Sequential(OrderedDict(features=features)), 512, [g for g in groups if g]


def _googlenet() -> BaseParts:
    # transform_input stays off: torchvision's pretrained GoogLeNet expects (x - 0.5) / 0.5 inputs
    # and only re-normalizes ImageNet-normalized ones; we feed it 0.5/0.5 directly (see defaults).
    network = models.googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=False)
    layers = OrderedDict((name, getattr(network, name)) for name in _GOOGLENET_FEATURES)
    stem = ["conv1", "conv2", "conv3"]
    inceptions = [[name] for name in _GOOGLENET_FEATURES if name.startswith("inception")]
    return nn.Sequential(layers), 1024, [stem, *inceptions]


TORCHVISION_BASES: dict[str, Callable[[], BaseParts]] = {
    "alexnet": _alexnet,
    "vgg16": _vgg16,
    "googlenet": _googlenet,
}
