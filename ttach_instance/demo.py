"""Demo helpers: bundled photos and a rendering of a space's candidates."""

from __future__ import annotations

import os
from typing import List

import numpy as np
import torch
from torch import Tensor

BUNDLED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def bundled_photos(size: int = 224, names=BUNDLED_PHOTOS) -> Tensor:
    """scikit-image's bundled RGB photos as a float batch ``(N, 3, size, size)`` in [0, 1]."""
    from PIL import Image
    from skimage import data

    images: List[Tensor] = []
    for name in names:
        arr = getattr(data, name)()
        img = Image.fromarray(arr).convert("RGB")
        side = min(img.size)
        left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    return torch.stack(images).float() / 255


def render_space(space_name: str = "paper12", output: str = "outputs/space_grid.png", size: int = 224) -> str:
    """Render every candidate of ``space_name`` on the bundled photos as a PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .registry import get_space

    space = get_space(space_name)
    photos = bundled_photos(size, names=BUNDLED_PHOTOS[:3])
    views = space.apply_all(photos).view(photos.shape[0], len(space), *photos.shape[1:])
    rows, cols = photos.shape[0], len(space)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(views[i, j].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(space.names[j], fontsize=7)
    fig.suptitle(f"space {space.name!r}: {len(space)} candidates (fingerprint {space.fingerprint})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
