"""Train a target classifier from scratch on an in-memory uint8 dataset (resumable, per epoch).

Used by the demo and the Tiny ImageNet benchmark; standard augmentation only (random crop
with reflect padding + horizontal flip), no corruptions, so corruptions hurt it as they hurt
ordinary models.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..io import (atomic_save_tensors, load_module_tensors, load_tensors, module_tensors,
                         optimizer_from_tensors, optimizer_to_tensors)


def augment_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (reflect padding ``pad``) and random horizontal flip of a float batch."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def train_classifier(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    normalize: Callable[[Tensor], Tensor],
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    seed: int = 0,
    checkpoint: Optional[str] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """SGD (momentum 0.9, nesterov) with a per-step cosine schedule; checkpoint every epoch."""
    from tqdm import tqdm

    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    start_epoch = 0
    if checkpoint and os.path.isfile(checkpoint):
        tensors, meta = load_tensors(checkpoint)
        load_module_tensors(model, tensors, "model")
        optimizer_from_tensors(opt, tensors, meta["optim"])
        start_epoch = meta["epoch"]
        log(f"resumed target training at epoch {start_epoch}/{epochs}")
    for epoch in range(start_epoch, epochs):
        model.train()
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"target epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        loss_sum = correct = 0.0
        for s in bar:
            step = epoch * steps_per_epoch + s
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            rows = perm[s * batch_size:(s + 1) * batch_size]
            x = augment_crop_flip(images[rows].float() / 255, g)
            logits = model(normalize(x))
            loss = nn.functional.cross_entropy(logits, labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(rows)
            correct += float((logits.argmax(1) == labels[rows]).sum())
        log(f"target epoch {epoch + 1}/{epochs}: loss {loss_sum / n:.3f} train acc {correct / n:.3f}")
        if checkpoint:
            otensors, ometa = optimizer_to_tensors(opt)
            atomic_save_tensors(checkpoint, {**module_tensors(model, "model"), **otensors},
                                {"epoch": epoch + 1, "epochs": epochs, "optim": ometa})
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, normalize, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(normalize(images[i:i + batch_size].float() / 255))
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(1, images.shape[0])
