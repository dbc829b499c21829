"""LeNet-5 (LeCun et al., 1998) adapted to RGB input of any size >= 32 px, trained from scratch."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5Features(nn.Module):
    """LeNet-5 up to its 84-unit layer; the final linear layer is the shared `ClassifierHead`.

    The adaptive pool makes the 5x5x16 feature map (what a 32x32 input gives) for any input of at
    least 32 px, so the fully connected layers keep LeNet-5's sizes whatever `--image-size` is.
    ReLU and max pooling replace the original tanh and subsampling, as in every modern LeNet-5.
    """

    num_features = 84
    block_groups = (("conv1",), ("conv2",), ("fc",))

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 6, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d((5, 5))
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU()
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv2(self.conv1(images))))
