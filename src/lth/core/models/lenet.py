"""Fully connected networks: LeNet-300-100 (MNIST, Fashion-MNIST) and the 2-N-1 XOR network."""

from __future__ import annotations

import math

import torch
from torch import nn

from lth.core.models.base import PrunableModel


class MLP(PrunableModel):
    def __init__(self, sizes: list[int], dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = self.dropout(torch.relu(layer(x)))
        return self.layers[-1](x)


def lenet_300_100(
    num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28), dropout: float = 0.0, **_: object
) -> MLP:
    """784-300-100-10 on 28x28 images: the input layer takes the dataset's example, flattened."""
    return MLP([math.prod(input_shape), 300, 100, num_classes], dropout)


def xor_net(hidden: int = 4, input_shape: tuple[int, ...] = (2,), **_: object) -> MLP:
    """2-N-1 network with a single logit (binary cross-entropy)."""
    return MLP([math.prod(input_shape), hidden, 1])
