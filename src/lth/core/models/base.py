"""What every network exposes to pruning: which weights are prunable and of which kind."""

from __future__ import annotations

import torch
from torch import nn

# Layer kinds, each with its own pruning rate (pruning.conv_rate, fc_rate, output_rate).
# "shortcut" weights (ResNet 1x1 projections) are never pruned, as in the paper.
KINDS = ("conv", "fc", "output", "shortcut")


class PrunableModel(nn.Module):
    """A network whose prunable weights are named and classified by layer kind."""

    def layer_kinds(self) -> dict[str, str]:
        """Parameter name of each conv/linear weight -> its kind. Biases and BatchNorm are never pruned."""
        kinds = {}
        modules = [(n, m) for n, m in self.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for i, (name, m) in enumerate(modules):
            if isinstance(m, nn.Conv2d):
                kinds[f"{name}.weight"] = "shortcut" if "shortcut" in name else "conv"
            else:
                kinds[f"{name}.weight"] = "output" if i == len(modules) - 1 else "fc"
        return kinds

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Gaussian Glorot weights, zero biases, BatchNorm at (1, 0): the paper's initialization."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                fan_out = m.weight.shape[0] * m.weight[0, 0].numel() if m.weight.dim() > 2 else m.weight.shape[0]
                std = (2.0 / (fan_in + fan_out)) ** 0.5
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
                    if m.bias is not None:
                        m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
