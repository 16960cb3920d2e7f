"""Tiny deterministic problems shared by the training tests (also run in subprocesses)."""

import torch
from torch import nn

from ttach_instance.registry import get_space


def tiny_model(classes: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def tiny_data(n: int = 10, size: int = 32, classes: int = 3):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return images, labels


class TinyPredictor(nn.Module):
    """Pixels -> (B, T) relative losses; no batch norm, so DDP and single-process runs agree."""

    def __init__(self, t: int = 12):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4, t)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def features(self, x):
        h = torch.relu(self.conv(x))
        return nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)

    def head_scores(self, features):
        return self.fc(features)

    def forward(self, x):
        return self.head_scores(self.features(x))


def space():
    return get_space("paper12")
