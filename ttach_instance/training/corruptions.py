"""ImageNet-C corruptions (imagecorruptions-imaug) on uint8 batches, reproducible per image.

``COMMON`` are the 15 corruptions used for training; ``HELD_OUT`` (speckle noise, gaussian
blur, spatter, saturate) stay out of training and serve as unseen corruptions at evaluation.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

COMMON: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
HELD_OUT: Tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL: Tuple[str, ...] = COMMON + HELD_OUT
SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)


def check_names(names: Sequence[str], arg: str = "corruptions") -> Tuple[str, ...]:
    if isinstance(names, str):
        names = {"common": COMMON, "held_out": HELD_OUT, "all": ALL}.get(names, (names,))
    names = tuple(names)
    bad = [n for n in names if n not in ALL]
    if bad:
        raise ValueError(f"{arg} must be ImageNet-C corruption names from {list(ALL)}, got unknown {bad}")
    return names


@functools.lru_cache(maxsize=None)  # called once per corrupted image: inspect each function once
def _takes_seed(name: str) -> bool:
    """Whether the corruption takes a ``seed`` argument: those that do (``glass_blur``: its numba
    kernel has its own RNG; ``impulse_noise``: skimage's ``random_noise``) draw from a fresh,
    unseeded generator without one, whatever numpy's global RNG was set to."""
    import inspect

    from imagecorruptions import corruption_dict

    return "seed" in inspect.signature(corruption_dict[name]).parameters


def corrupt_one(image_hwc: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """One uint8 HxWx3 image corrupted reproducibly: the same ``seed`` gives the same image
    (numpy's global RNG seeded for the corruptions that draw from it, ``seed=`` passed to those
    that take one)."""
    from imagecorruptions import corrupt

    if severity not in SEVERITIES:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    check_names([name], "name")
    kwargs = {"seed": int(seed) % (2 ** 32)} if _takes_seed(name) else {}
    state = np.random.get_state()
    np.random.seed(seed % (2 ** 32))
    try:
        out = corrupt(image_hwc, corruption_name=name, severity=int(severity), **kwargs)
    finally:
        np.random.set_state(state)
    out = np.asarray(out)
    if out.shape != image_hwc.shape:  # a few corruptions return a different size; crop/pad back
        fixed = np.zeros_like(image_hwc)
        h, w = min(out.shape[0], image_hwc.shape[0]), min(out.shape[1], image_hwc.shape[1])
        fixed[:h, :w] = out[:h, :w, :3]
        out = fixed
    return np.clip(out, 0, 255).astype(np.uint8)


def corrupt_batch(images: Tensor, names: Sequence[Optional[str]], severities: Sequence[int],
                  seeds: Sequence[int]) -> Tensor:
    """Corrupt each image ``i`` of a uint8 ``(N, 3, H, W)`` batch by ``names[i]`` (``None``: untouched)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    out = images.clone()
    hwc = images.permute(0, 2, 3, 1).numpy()
    for i, (name, sev, seed) in enumerate(zip(names, severities, seeds)):
        if name is None:
            continue
        out[i] = torch.from_numpy(corrupt_one(np.ascontiguousarray(hwc[i]), name, int(sev), int(seed))).permute(2, 0, 1)
    return out


def draw_recipes(rows: Sequence[int], seed: int, p: float, names: Sequence[str],
                 severities: Sequence[int] = SEVERITIES) -> List[Tuple[Optional[str], int, int]]:
    """Per-row ``(name or None, severity, corruption seed)``: a pure function of (seed, row)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"corruption probability p must be in [0, 1], got {p}")
    out = []
    for r in rows:
        rng = np.random.default_rng([int(seed), int(r)])
        hit = rng.random() < p and len(names) > 0
        name = names[int(rng.integers(len(names)))] if hit else None
        sev = int(severities[int(rng.integers(len(severities)))]) if hit else 0
        out.append((name, sev, int(rng.integers(2 ** 31))))
    return out
