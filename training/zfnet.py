"""ZFNet (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014;
arXiv:1311.2901, 2013), trained from scratch: there are no ZFNet weights to load offline.

The paper's layer table (its Fig. 3, 224x224x3 input):

    layer 1: 96 filters 7x7, stride 2       -> 110x110x96; 3x3 max pool, stride 2 -> 55x55x96; contrast norm
    layer 2: 256 filters 5x5, stride 2      -> 26x26x256;  3x3 max pool, stride 2 -> 13x13x256; contrast norm
    layer 3: 384 filters 3x3, stride 1      -> 13x13x384
    layer 4: 384 filters 3x3, stride 1      -> 13x13x384
    layer 5: 256 filters 3x3, stride 1      -> 13x13x256;  3x3 max pool, stride 2 -> 6x6x256
    layers 6, 7: fully connected, 4096 units each; then a C-way softmax

What changes from AlexNet: a 7x7 stride-2 first convolution (AlexNet: 11x11 stride 4, whose filters
the authors' visualizations showed to be aliased and partly dead), a stride-2 second convolution, and
dense connections in layers 3-5 instead of AlexNet's two-GPU split. Every convolution is followed by a
ReLU; "contrast norm" is the cross-channel local response normalization of AlexNet.

The 55 and 13 of the table need padding 1 in layer 1 and ceil-mode pooling in layers 1-2 (Caffe's
pooling rounds up). Layers 6-7 are replaced by the shared head (global pool -> dropout -> linear),
as for AlexNet and VGG16 here: they hold 55M of the network's 62M parameters, exist to map a 6x6
map to 1000 ImageNet classes, and would make every exported file ~220 MB.
"""

from __future__ import annotations

import torch
from torch import nn


def _contrast_norm() -> nn.LocalResponseNorm:
    # AlexNet's constants (size 5, alpha 1e-4, beta 0.75, k 2); the ZFNet paper reuses its normalization.
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)


class ZFNetFeatures(nn.Module):
    """Layers 1-5 of ZFNet; one block group per layer, so `--unfreeze-blocks 2` trains layers 4-5."""

    num_features = 256
    block_groups = (("layer1",), ("layer2",), ("layer3",), ("layer4",), ("layer5",))

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            _contrast_norm(),
        )
        self.layer2 = nn.Sequential(
            nn.Conv2d(96, 256, kernel_size=5, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            _contrast_norm(),
        )
        self.layer3 = nn.Sequential(nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True))
        self.layer4 = nn.Sequential(nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True))
        self.layer5 = nn.Sequential(
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                # He initialization: with no BatchNorm, the paper's N(0, 0.01) stalls five ReLU layers
                # deep under a from-scratch AdamW recipe; fan-in scaling keeps activations O(1).
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.layer2(self.layer1(images))
        return self.layer5(self.layer4(self.layer3(features)))
