"""The shape every network takes: `Classifier(base, head)` with the base's block groups, bottom to top.

The same shape for every network lets freezing, unfreezing, export and the tests treat LeNet-5 and
EfficientNet-Lite0 alike. `base` maps images to features (a feature map or, for LeNet-5, a vector),
`head` is the new classifier (global pool -> dropout -> linear), and `block_groups` lists the base's
modules from the input (bottom) to the output (top), so "unfreeze the top N groups" is well defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

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
