"""Segmentation's own pieces: per-image losses, the confusion matrix and mIoU, and the per-view
losses that label a segmentation predictor.

The segmentation wrappers are presets of the one pipeline in :mod:`ttach_instance.wrappers`
(``dense=True``): :class:`~ttach_instance.wrappers.LossGuidedSegmentationWrapper`,
:class:`~ttach_instance.wrappers.SegmentationTTAWrapper`,
:class:`~ttach_instance.wrappers.RandomKSegmentationWrapper`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as TF
from torch import Tensor

LOSS_KINDS = ("ce", "dice")

__all__ = ["LOSS_KINDS", "segmentation_loss", "ConfusionMatrix", "segmentation_metrics", "view_losses"]


# --------------------------------------------------------------------------- losses, metrics


def segmentation_loss(
    logits: Tensor,
    target: Tensor,
    kind: str = "ce",
    ignore_index: int = 255,
    smooth: float = 1.0,
) -> Tensor:
    """Per-image loss ``(N,)`` of logits ``(N, K, H, W)`` against labels ``(N, H, W)``.

    ``"ce"``: mean pixel cross-entropy over the pixels that are not ``ignore_index`` (an image
    with no labelled pixel scores 0). ``"dice"``: ``1 - mean_c dice_c`` over the classes,
    soft Dice on the softmax probabilities, ``(2 |p y| + s) / (|p| + |y| + s)``, ignored pixels
    left out.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {list(LOSS_KINDS)}, got {kind!r}")
    if not isinstance(logits, Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        raise TypeError(f"logits must be a float (N, K, H, W) tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if not isinstance(target, Tensor) or target.dim() != 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target must be integer labels of shape (N, H, W) = {(logits.shape[0],) + tuple(logits.shape[2:])}, "
            f"got {tuple(getattr(target, 'shape', ()))}"
        )
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class labels, got dtype {target.dtype}")
    target = target.long()
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    if kind == "ce":
        ce = TF.cross_entropy(logits.float(), safe, reduction="none") * keep
        return ce.flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    probs = logits.float().softmax(1) * keep[:, None]
    onehot = TF.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).float() * keep[:, None]
    inter = (probs * onehot).flatten(2).sum(-1)
    total = probs.flatten(2).sum(-1) + onehot.flatten(2).sum(-1)
    dice = (2 * inter + smooth) / (total + smooth)
    return 1 - dice.mean(1)


class ConfusionMatrix:
    """Accumulates a ``K x K`` confusion matrix (rows: truth, columns: prediction) on the
    predictions' device; :meth:`metrics` gives mIoU (over classes present in truth or
    prediction), per-class IoU and pixel accuracy."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix: Optional[Tensor] = None

    def update(self, preds: Tensor, target: Tensor) -> "ConfusionMatrix":
        if preds.shape != target.shape:
            raise ValueError(f"preds and target must have the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}")
        keep = target != self.ignore_index
        k = self.num_classes
        code = target.long() * k + preds.long()
        counts = torch.bincount(code[keep].reshape(-1), minlength=k * k)[: k * k].reshape(k, k)
        self.matrix = counts if self.matrix is None else self.matrix + counts.to(self.matrix.device)
        return self

    def metrics(self) -> Dict[str, Any]:
        k = self.num_classes
        m = (self.matrix if self.matrix is not None else torch.zeros(k, k, dtype=torch.long)).double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": iou.tolist(),
        }


def segmentation_metrics(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of label maps ``preds`` against ``target``."""
    return ConfusionMatrix(num_classes, ignore_index).update(preds, target).metrics()


@torch.no_grad()
def view_losses(model: Callable[[Tensor], Any], space: Any, images: Tensor, target: Tensor, loss: str = "ce",
                ignore_index: int = 255, interpolation: str = "bilinear", coverage: str = "extrapolate",
                output_mask_key: Optional[str] = None, mean: Any = None, std: Any = None,
                chunk_size: Optional[int] = None,
                return_accuracy: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-image loss of every candidate ``(B, len(space))``: each candidate's view of ``images``
    (normalised as the model wants; ``mean``/``std`` as the wrappers resolve them) through the
    model, de-augmented, uncovered pixels filled as the ``k = 1`` wrapper with this ``coverage``
    fills them, scored against ``target`` ``(B, H, W)`` -- the loss the loss-guided wrapper would
    incur choosing that candidate alone: the labels the predictor learns to rank.

    ``return_accuracy=True``: ``(losses, accuracy)``, ``accuracy`` ``(B, len(space))`` the pixel
    accuracy of each candidate's k=1 prediction (0 for an image without labelled pixels)."""
    from .wrappers import SegmentationTTAWrapper

    wrapper = SegmentationTTAWrapper(model, space, merge_space="logits", mean=mean, std=std,
                                     interpolation=interpolation, coverage=coverage, output_mask_key=output_mask_key,
                                     chunk_size=chunk_size)
    r = wrapper.run(images)
    views, valid = r["views"], r["validity"]  # (B, T, K, H, W), (B, T, 1, H, W)
    b, t = views.shape[:2]
    if coverage == "identity":
        ident = wrapper._call_model(images, b, (), {})[:, None].expand_as(views)
        views = torch.where(valid > 0, views, ident)
    flat = views.reshape((b * t,) + views.shape[2:])
    tgt = target.to(flat.device).repeat_interleave(t, 0)
    losses = segmentation_loss(flat, tgt, kind=loss, ignore_index=ignore_index).reshape(b, t)
    if not return_accuracy:
        return losses
    keep = tgt != ignore_index
    hits = ((flat.argmax(1) == tgt) & keep).flatten(1).sum(1)
    accuracy = (hits.float() / keep.flatten(1).sum(1).clamp_min(1).float()).reshape(b, t)
    return losses, accuracy
