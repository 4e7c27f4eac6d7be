"""Conv-2, Conv-4 and Conv-6 for CIFAR-10 (Frankle & Carbin 2019, Figure 2; scaled-down VGG variants).

Blocks of two 3x3 convolutions (padding 1, ReLU) each followed by 2x2 max-pooling, then fully
connected layers 256, 256, 10. No BatchNorm. Dropout (the paper's dropout variants) is applied after
each hidden fully connected layer. The input shape is the dataset's (3x32x32 for CIFAR, 1x28x28 for
MNIST and Fashion-MNIST): it sets the first convolution's channels and the first fully connected layer's
inputs (28 pixels pool to 14, 7, 3, as max-pooling floors).
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
        input_shape: tuple[int, ...] = (3, 32, 32),
    ):
        super().__init__()
        convs: list[nn.Module] = []
        c, height, width = input_shape
        for channels in blocks:
            convs += [
                nn.Conv2d(c, channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c = channels
        self.features = nn.Sequential(*convs)
        pooled = 2 ** len(blocks)
        sizes = [c * (height // pooled) * (width // pooled), *fc]
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.output = nn.Linear(sizes[-1], num_classes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        for layer in self.fc:
            x = self.dropout(torch.relu(layer(x)))
        return self.output(x)


def conv2(
    num_classes: int = 10, dropout: float = 0.0, input_shape: tuple[int, ...] = (3, 32, 32), **_: object
) -> ConvNet:
    return ConvNet([64], num_classes=num_classes, dropout=dropout, input_shape=input_shape)


def conv4(
    num_classes: int = 10, dropout: float = 0.0, input_shape: tuple[int, ...] = (3, 32, 32), **_: object
) -> ConvNet:
    return ConvNet([64, 128], num_classes=num_classes, dropout=dropout, input_shape=input_shape)


def conv6(
    num_classes: int = 10, dropout: float = 0.0, input_shape: tuple[int, ...] = (3, 32, 32), **_: object
) -> ConvNet:
    return ConvNet([64, 128, 256], num_classes=num_classes, dropout=dropout, input_shape=input_shape)
