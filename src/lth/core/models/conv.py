"""Conv-2, Conv-4 and Conv-6 for CIFAR-10 (Frankle & Carbin 2019, Figure 2; scaled-down VGG variants).

Blocks of two 3x3 convolutions (padding 1, ReLU) each followed by 2x2 max-pooling, then fully
connected layers 256, 256, 10. No BatchNorm. Dropout (the paper's dropout variants) is applied after
each hidden fully connected layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lth.core.models.base import PrunableModel


class ConvNet(PrunableModel):
    def __init__(
        self,
        blocks: list[int],
        fc: tuple[int, ...] = (256, 256),
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
        image_size: int = 32,
    ):
        super().__init__()
        convs: list[nn.Module] = []
        c = in_channels
        for width in blocks:
            convs += [
                nn.Conv2d(c, width, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c = width
        self.features = nn.Sequential(*convs)
        side = image_size // 2 ** len(blocks)
        sizes = [c * side * side, *fc]
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.output = nn.Linear(sizes[-1], num_classes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        for layer in self.fc:
            x = self.dropout(torch.relu(layer(x)))
        return self.output(x)


def conv2(num_classes: int = 10, dropout: float = 0.0, **_: object) -> ConvNet:
    return ConvNet([64], num_classes=num_classes, dropout=dropout)


def conv4(num_classes: int = 10, dropout: float = 0.0, **_: object) -> ConvNet:
    return ConvNet([64, 128], num_classes=num_classes, dropout=dropout)


def conv6(num_classes: int = 10, dropout: float = 0.0, **_: object) -> ConvNet:
    return ConvNet([64, 128, 256], num_classes=num_classes, dropout=dropout)
