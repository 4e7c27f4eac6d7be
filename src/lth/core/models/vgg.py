"""VGG-16 and VGG-19 for CIFAR-10 (Frankle & Carbin 2019, Figure 2; the CIFAR variant of open_lth).

3x3 convolutions (padding 1) each followed by BatchNorm and ReLU, 2x2 max-pooling between groups
(four times, 32 -> 2 pixels), 2x2 average pooling, and one linear output layer of 512 -> 10. It needs
32x32 inputs (CIFAR-10, CIFAR-100, SVHN): 28 pixels would pool to 1 before the average pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from lth.core.models.base import PrunableModel

# Channels per convolution; "M" is a 2x2 max-pool.
CONFIGS = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(PrunableModel):
    def __init__(self, depth: int = 19, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        layers.append(nn.AvgPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def vgg16(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), **_: object) -> VGG:
    return VGG(16, num_classes, in_channels=input_shape[0])


def vgg19(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), **_: object) -> VGG:
    return VGG(19, num_classes, in_channels=input_shape[0])
