"""Tiny deterministic problems shared by the training tests (also run in subprocesses)."""

from typing import Any, Dict, Union

import torch
from torch import nn

from ttach_instance.predictors import Field, LossPredictorBase, register_predictor
from ttach_instance.predictors.base import checked_pixels, resize_antialiased
from ttach_instance.registry import get_space
from ttach_instance.space import TransformSpace


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


@register_predictor("tiny_test")
class TinyPredictor(LossPredictorBase):
    """Pixels -> (B, T) relative losses: the image resized to ``input_size``, a stride-2 conv,
    ReLU, a 2x2 average pool (24 features) and the ranking ``head``. No batch norm, so DDP and
    single-process runs agree; a fixed init (seed 2) whatever the global generator holds.

    ``space``: a space, or ``T`` for the first ``T`` candidates of paper12 (the identity first).
    """

    config_schema = {"input_size": Field("int", 8, 64)}

    def __init__(self, space: Union[int, TransformSpace, str] = 12, input_size: int = 8):
        if isinstance(space, int) and not isinstance(space, bool):
            space = get_space("paper12") if space == 12 else get_space("paper12").subset(list(range(space)))
        super().__init__(space, input_size)
        g = torch.Generator().manual_seed(2)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6 * 4, len(self.space))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = resize_antialiased(checked_pixels(pixels), self.input_size)
        h = torch.relu(self.conv(x))
        return nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)

    def config(self) -> Dict[str, Any]:
        return {"input_size": self.input_size}


def space():
    return get_space("paper12")


def two_class_folder(root, splits: Dict[str, int], size: int = 32) -> str:
    """An ImageFolder ``root/ds/<split>/{ants,bees}/<i>.png`` of ``splits[split]`` random images per
    class (class 1 brighter, so a model can tell them apart); returns ``root/ds``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for c, cls in enumerate(("ants", "bees")):
            d = root / "ds" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((size, size, 3)) * 120 + 100 * c).astype(np.uint8)).save(d / f"{i}.png")
    return str(root / "ds")
