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
    #: ``True`` when targets are per-pixel label maps ``(B, H, W)`` (resized with the images).
    dense = False

    def view_losses(self, model: nn.Module, views: Tensor, targets: Tensor, space, index: Tensor) -> Tensor:
        raise NotImplementedError

    def view_outputs(self, model: nn.Module, views: Tensor, targets: Tensor, space, index: Tensor) -> dict:
        """``{"losses": (B, k), ...}``: extra per-view fields (e.g. ``correct``) go to the label cache."""
        return {"losses": self.view_losses(model, views, targets, space, index)}

    def spec(self) -> dict:
        return {"name": self.name}


def identity_column(space, index: Tensor) -> Optional[int]:
    """The column of ``index`` ``(B, k)`` that holds an identity candidate of ``space`` in every
    row, or ``None``."""
    candidates = getattr(space, "candidates", None)
    if candidates is None or index.numel() == 0:
        return None
    for j in range(index.shape[1]):
        if all(candidates[int(i)].is_identity for i in index[:, j].unique().tolist()):
            return j
    return None


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
        """Losses and ``correct`` flags per view; plus ``input_logits`` ``(B, C)`` (float16): the
        model's logits on the untransformed image, read off the identity candidate's view when
        every row has one (no extra model call) -- what the predictor trainer's distillation term
        (``FitConfig.distill_weight``) learns from."""
        k = index.shape[1] if index.dim() == 2 else 1
        logits = self.logits(model, views)
        correct = (logits.argmax(1) == targets.repeat_interleave(k, 0)).view(-1, k)
        out = {"losses": self.losses_from_logits(logits, targets, k), "correct": correct.to(torch.uint8)}
        column = identity_column(space, index.view(-1, k))
        if column is not None and logits.dim() == 2:
            out["input_logits"] = logits.view(-1, k, logits.shape[1])[:, column].to(torch.float16)
        return out

    def spec(self) -> dict:
        fn = self.loss_fn
        return {"name": self.name, "loss": "cross_entropy" if fn is None else getattr(fn, "__name__", repr(fn))}


class SegmentationTask(Task):
    """Per-image segmentation loss of every view, after de-augmenting its dense logits.

    The model maps ``(N, C, H, W)`` to logits ``(N, K, H', W')`` (or a dict holding them under
    ``output_key``); each view's output is brought back to the input frame with
    :meth:`~ttach_instance.space.TransformSpace.deaugment` and scored against the label map
    ``(B, H', W')``: ``loss="ce"`` mean pixel cross-entropy without ``ignore_index`` pixels,
    ``"dice"`` 1 - mean soft Dice. Pixels the view did not see are filled as the ``k = 1``
    loss-guided wrapper fills them (``coverage="extrapolate"``: nearest covered value;
    ``"zero"``: 0 logits), so the label is the loss the wrapper would incur picking that view.
    """

    name = "segmentation"
    dense = True

    def __init__(self, loss: str = "ce", ignore_index: int = 255, coverage: str = "extrapolate",
                 interpolation: str = "bilinear", output_key: Optional[str] = None):
        from ..segmentation import LOSS_KINDS
        from ..wrappers import INTERPOLATIONS

        if loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {list(LOSS_KINDS)}, got {loss!r}")
        if coverage not in ("extrapolate", "zero"):
            raise ValueError(f"coverage must be 'extrapolate' or 'zero' for label generation, got {coverage!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.loss = loss
        self.ignore_index = ignore_index
        self.coverage = coverage
        self.interpolation = interpolation
        self.output_key = output_key

    def view_losses(self, model: nn.Module, views: Tensor, targets: Tensor, space, index: Tensor) -> Tensor:
        from ..segmentation import segmentation_loss

        if index.dim() == 1:
            index = index[:, None]
        b, k = index.shape
        if targets.dim() != 3 or targets.shape[0] != b:
            raise ValueError(f"targets must be label maps (B, H, W) with B = {b}, got {tuple(targets.shape)}")
        out = model(views)
        if self.output_key is not None:
            if not isinstance(out, dict) or self.output_key not in out:
                raise KeyError(f"output key {self.output_key!r} is not among the model's outputs "
                               f"{list(out) if isinstance(out, dict) else type(out).__name__}")
            out = out[self.output_key]
        if not isinstance(out, Tensor) or out.dim() != 4 or not out.is_floating_point():
            raise TypeError(f"the model must return dense float logits (N, K, H, W), got "
                            f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
        if out.shape[-2:] != targets.shape[-2:]:
            raise ValueError(f"the model's logits are {tuple(out.shape[-2:])} but the masks are "
                             f"{tuple(targets.shape[-2:])}; masks must match the model's output resolution")
        fill = "border" if self.coverage == "extrapolate" else "zero"
        back, _ = space.deaugment(out, index, mode=self.interpolation, fill=fill, image_size=tuple(views.shape[-2:]))
        losses = segmentation_loss(back, targets.repeat_interleave(k, 0), kind=self.loss,
                                   ignore_index=self.ignore_index)
        return losses.view(b, k)

    def spec(self) -> dict:
        return {"name": self.name, "loss": self.loss, "ignore_index": self.ignore_index, "coverage": self.coverage,
                "interpolation": self.interpolation}
