"""Small random deformations of training images for the loss labels (the paper's recipe).

The paper labels each training image under a small random rotation, zoom and brightness change
(besides the ImageNet-C corruption), so that every draw of an image is a new input. Without it
the clean rows of a multi-draw label cache are identical copies of one another (with
``corruption_p = 0.4`` and 3 draws, ~60 % of the rows, each image ~2x per cache): the
predictor sees the same clean input with the same labels again and again.

:class:`Deformation` is the range of each factor; :func:`draw_deformations` draws one
``(angle, scale, brightness)`` per row as a pure function of ``(seed, row)`` (like the
corruption recipes, so any shard of a cache can be recomputed identically);
:func:`deform_batch` applies them to a uint8 batch with the library's ops (rotation and zoom
with mirrored borders, then a brightness factor).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import functional as F


@dataclass(frozen=True)
class Deformation:
    """Uniform ranges: rotation in ``[-rotate, rotate]`` degrees, zoom scale in
    ``[1 - zoom, 1 + zoom]``, brightness factor in ``[1 - brightness, 1 + brightness]``."""

    rotate: float = 10.0
    zoom: float = 0.1
    brightness: float = 0.15

    def __post_init__(self):
        if not 0 <= self.rotate <= 45:
            raise ValueError(f"Deformation.rotate must be in [0, 45] degrees, got {self.rotate}")
        for name in ("zoom", "brightness"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"Deformation.{name} must be in [0, 1), got {getattr(self, name)}")

    def spec(self) -> Dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_spec(cls, spec) -> "Deformation":
        if isinstance(spec, Deformation):
            return spec
        if not isinstance(spec, dict):
            raise TypeError(f"a deformation must be a Deformation or a dict of its fields, got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"rotate", "zoom", "brightness"})
        if unknown:
            raise ValueError(f"unknown deformation fields {unknown}; expected rotate, zoom, brightness")
        return cls(**spec)


def draw_deformations(rows: Sequence[int], seed: int, deformation: Deformation) -> List[Tuple[float, float, float]]:
    """Per-row ``(angle, scale, brightness)``: a pure function of ``(seed, row)``, drawn from a
    stream of its own (the corruption recipes of the same rows are unchanged by it)."""
    out = []
    for r in rows:
        rng = np.random.default_rng([int(seed), int(r), 1])
        u = rng.uniform(-1.0, 1.0, size=3)
        out.append((float(u[0] * deformation.rotate), float(1 + u[1] * deformation.zoom),
                    float(1 + u[2] * deformation.brightness)))
    return out


def deform_batch(images: Tensor, params: Sequence[Tuple[float, float, float]]) -> Tensor:
    """Apply per-row ``(angle, scale, brightness)`` to a uint8 ``(N, 3, H, W)`` batch; uint8 out."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images must be uint8 (N, 3, H, W), got {getattr(images, 'dtype', type(images))}")
    if len(params) != images.shape[0]:
        raise ValueError(f"params must have one (angle, scale, brightness) per image ({images.shape[0]}), "
                         f"got {len(params)}")
    if not len(params):
        return images.clone()
    angle, scale, bright = (torch.tensor(v, dtype=torch.float32, device=images.device) for v in zip(*params))
    _, _, h, w = images.shape
    # One bicubic resampling through the composed map, mirrored borders. Not the PIL-exact
    # rotate/zoom of the candidates: a random deformation needs no bit-exactness, and distinct
    # angles per row make the exact CPU rotation build one sparse matrix per image (~20x slower).
    theta = F.compose_theta(F.zoom_theta(scale, h, w), F.rotation_theta(angle, h, w))  # rotate, then zoom
    x = F.warp(images.float() / 255, theta, mode="bicubic", padding_mode="reflection")
    x = (x * bright.view(-1, 1, 1, 1)).clamp_(0, 1)
    return (x * 255).round_().to(torch.uint8)
