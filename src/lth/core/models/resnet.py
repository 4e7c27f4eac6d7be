"""ResNet-20 for CIFAR-10 (He et al. 2016; Frankle & Carbin 2019 call it "Resnet-18", Figure 2).

A 3x3 convolution with 16 channels, three stages of three residual blocks (16, 32, 64 channels; the
first block of stages 2 and 3 halves the resolution), global average pooling and a linear output.
Each block is conv-BN-ReLU-conv-BN plus the shortcut, then ReLU. Where the shape changes the shortcut
is a 1x1 convolution with BatchNorm; its module is named `shortcut`, which makes
`PrunableModel.layer_kinds()` classify it as "shortcut" (never pruned, as in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lth.core.models.base import PrunableModel


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(PrunableModel):
    def __init__(
        self, depth: int = 20, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10, in_channels: int = 3
    ):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, c = [], widths[0]
        for s, w in enumerate(widths):
            for i in range(n):
                blocks.append(Block(c, w, stride=2 if (s > 0 and i == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), **_: object) -> ResNet:
    return ResNet(20, num_classes=num_classes, in_channels=input_shape[0])
