"""A small target model for CPU-sized experiments (the demo and the Tiny ImageNet benchmark).

An importable factory, so the CLI can load it as ``ttach_instance.models:small_resnet``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, one residual block per stage, stride 2 between stages.

    Expects inputs normalised with ``mean``/``std`` (stored as attributes so wrappers can find
    them); outputs logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        blocks: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_channels: int = 3,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.head(x.mean((2, 3)))


def small_resnet(num_classes: int = 10, width: int = 16, blocks: int = 1) -> SmallResNet:
    """Factory for :class:`SmallResNet` with widths ``(w, 2w, 4w)``."""
    return SmallResNet(num_classes, widths=(width, 2 * width, 4 * width), blocks=blocks)
