"""Tasks turn a model's outputs on augmented views into per-view losses.

A task has ``view_losses(model, views, targets, space, index) -> (B, k)``: ``views`` are the
model-ready inputs ``(B * k, C, H, W)`` in sample-major order (row ``i * k + j`` is sample
``i`` under candidate ``index[i, j]``), ``targets`` the per-sample targets ``(B, ...)``.
Dense tasks (segmentation) de-augment with ``space.deaugment(outputs, index)`` before
comparing with ``targets``; classification needs no de-augmentation.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn


class Task:
    """Base class: subclasses implement :meth:`view_losses`."""

    name = "task"
    #: ``True`` when targets are class indices and k=1 accuracy makes sense.
    classification = False

    def view_losses(self, model: nn.Module, views: Tensor, targets: Tensor, space, index: Tensor) -> Tensor:
        raise NotImplementedError

    def view_outputs(self, model: nn.Module, views: Tensor, targets: Tensor, space, index: Tensor) -> dict:
        """``{"losses": (B, k), ...}``: extra per-view fields (e.g. ``correct``) go to the label cache."""
        return {"losses": self.view_losses(model, views, targets, space, index)}

    def spec(self) -> dict:
        return {"name": self.name}


class ClassificationTask(Task):
    """Per-sample loss of logits against class targets; cross-entropy by default.

    ``loss_fn(logits (N, C), targets (N,)) -> (N,)`` may be any per-sample callable.
    """

    name = "classification"
    classification = True

    def __init__(self, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 output_key: Optional[str] = None):
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (logits, targets) -> per-sample losses, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.output_key = output_key

    def logits(self, model: nn.Module, views: Tensor) -> Tensor:
        out = model(views)
        if self.output_key is not None:
            out = out[self.output_key]
        return out

    def losses_from_logits(self, logits: Tensor, targets: Tensor, k: int) -> Tensor:
        reps = targets.repeat_interleave(k, 0)
        if self.loss_fn is None:
            losses = nn.functional.cross_entropy(logits.float(), reps, reduction="none")
        else:
            losses = self.loss_fn(logits, reps)
        if losses.shape != (logits.shape[0],):
            raise ValueError(f"loss_fn must return one loss per sample, shape ({logits.shape[0]},), got {tuple(losses.shape)}")
        return losses.view(-1, k)

    def view_losses(self, model: nn.Module, views: Tensor, targets: Tensor, space, index: Tensor) -> Tensor:
        k = index.shape[1] if index.dim() == 2 else 1
        return self.losses_from_logits(self.logits(model, views), targets, k)

    def view_outputs(self, model: nn.Module, views: Tensor, targets: Tensor, space, index: Tensor) -> dict:
        k = index.shape[1] if index.dim() == 2 else 1
        logits = self.logits(model, views)
        correct = (logits.argmax(1) == targets.repeat_interleave(k, 0)).view(-1, k)
        return {"losses": self.losses_from_logits(logits, targets, k), "correct": correct.to(torch.uint8)}

    def spec(self) -> dict:
        fn = self.loss_fn
        return {"name": self.name, "loss": "cross_entropy" if fn is None else getattr(fn, "__name__", repr(fn))}
