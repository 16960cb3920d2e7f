"""``SmallLossPredictor``: a light plain CNN (a :class:`~ttach_instance.models.SmallResNet` body)
for small images, where a timm backbone trained from scratch ranks no better at several times
the cost (docs/BENCHMARKS.md, "Loss predictor cost")."""

from __future__ import annotations

from typing import Any, Dict, Union

import torch
from torch import Tensor, nn

from ..models import IMAGENET_MEAN, IMAGENET_STD, SmallResNet
from ..space import TransformSpace
from .registry import register_predictor
from .base import MAX_SIDE, Field, LossPredictorBase, checked_pixels, resize_antialiased

__all__ = ["SmallLossPredictor"]


@register_predictor("small")
class SmallLossPredictor(LossPredictorBase):
    """Pixels in [0, 1] ``(B, 3, H, W)`` -> ``(B, |T|)`` relative losses (lower = better): the image
    resized to ``input_size``, a ``SmallResNet`` of widths ``(w, 2w, 4w)``, its last stage pooled,
    the ranking ``head``. ``init_from`` starts it from a ``SmallResNet`` target of the same width."""

    config_schema = {"width": Field("int", 1, 512), "input_size": Field("int", 8, MAX_SIDE)}

    def __init__(self, space: Union[TransformSpace, str], width: int = 8, input_size: int = 32):
        super().__init__(space, input_size)
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 512:
            raise ValueError(f"width must be an int in [1, 512], got {width!r}")
        self.width = width
        widths = (width, 2 * width, 4 * width)
        body = SmallResNet(len(self.space), widths)
        self.stem, self.layers = body.stem, body.layers
        self.head = body.head
        self.register_buffer("pix_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pix_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def features(self, pixels: Tensor) -> Tensor:
        """The last stage's pooled vector ``(B, 4 * width)``."""
        x = resize_antialiased(checked_pixels(pixels), self.input_size)
        x = ((x - self.pix_mean) / self.pix_std).to(self.pix_mean.dtype)
        return self.layers(self.stem(x)).mean((2, 3))

    def config(self) -> Dict[str, Any]:
        return {"width": self.width, "input_size": self.input_size}

    def init_from(self, model: nn.Module) -> "SmallLossPredictor":
        """Start from a trained :class:`SmallResNet` classifier's layers (every weight but its
        classifier head) and its input normalisation; the ranking head stays fresh -- the
        stand-in for a pretrained backbone: the features already know what the target sees.
        Widths must match (``SmallResNet`` widths ``(w, 2w, 4w)`` -> ``width=w``). Returns ``self``."""
        if not isinstance(model, SmallResNet):
            raise TypeError(f"init_from needs a SmallResNet classifier, got {type(model).__name__}")
        theirs = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        mine = {k: v for k, v in self.state_dict().items() if k.startswith(("stem.", "layers."))}
        bad = [f"{k}: {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in theirs.items()
               if k in mine and mine[k].shape != v.shape]
        if bad or set(mine) != set(theirs):
            widths = [m.conv1.out_channels for m in model.layers]
            raise ValueError(f"init_from: the classifier (stage widths {widths}) does not match this predictor "
                             f"(width={self.width}); mismatched {bad[:3]}, missing "
                             f"{sorted(set(mine) ^ set(theirs))[:3]}")
        with torch.no_grad():
            for k, v in theirs.items():
                mine[k].copy_(v)
            self.pix_mean.copy_(torch.tensor(model.mean).view(1, 3, 1, 1))
            self.pix_std.copy_(torch.tensor(model.std).view(1, 3, 1, 1))
        return self
