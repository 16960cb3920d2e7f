"""Merging the outputs of the views of each sample: ``(B, k, ...)`` -> ``(B, ...)``.

Modes (:data:`MERGE_MODES`):

* ``mean``, ``sum``, ``max``, ``min``, ``gmean``, ``tsharpen`` -- ttach's :class:`ttach.base.Merger`
  modes. Where ttach gives a number the result is ttach's, bit for bit: the views are
  accumulated one after the other in view order exactly as ``Merger.append`` does.
* ``weighted`` -- a weighted mean with weights ``softmax(-losses / temperature)`` over the
  ``k`` views of each sample (``losses``: the predicted losses of the selected candidates;
  lower loss = more weight; ``temperature`` -> inf is ``mean``, -> 0 is the best view alone).

**Negative values in gmean and tsharpen.** ttach computes ``prod(x) ** (1/k)`` and
``mean(x ** 0.5)``, which are NaN for negative inputs (logits; ttach issue #4). Here both are
extended as *odd* functions -- the real root, sign preserved:
``gmean = sign(prod x) * |prod x| ** (1/k)`` and ``tsharpen = mean(sign(x) * |x| ** 0.5)``.
Why this rather than switching to probabilities: (1) on non-negative inputs (probabilities,
scores: what these modes are meant for) it *is* ttach's result, so moving from ttach never
changes a number that was defined; (2) the output stays in the model's output space (a
drop-in wrapper returning probabilities for a logit model would silently change its
contract); (3) no data-dependent switch. For logits, note that the geometric mean of the
softmax probabilities of the views is ``softmax(mean of logits)`` after renormalisation, so
``mean`` on logits already *is* the probability-space geometric mean. ``tsharpen``'s extension
is continuous and monotone in every input; ``gmean``'s real root of a mixed-sign product is
well defined but not monotone -- prefer ``mean`` on logits.

**Per-element weights** (``weights``, broadcastable to ``outputs``, e.g. validity maps
``(B, k, 1, H, W)`` of de-augmented dense outputs; non-negative): every mode becomes its
weighted form and entries of weight 0 are ignored entirely -- even NaN or inf values there do
not leak into the result. ``mean``/``weighted``/``tsharpen``: ``sum(w f(x)) / sum(w)``;
``gmean``: ``sign * exp(sum(w log|x|) / sum(w))`` (sign of the product of the weighted
entries); ``sum``: ``sum(w x)``; ``max``/``min`` over the entries of positive weight. Where
all the per-element weights of an element are 0 the element gets the merge without them (no
view is preferred, so every view counts; for ``weighted`` the views keep their loss weights),
which keeps the output finite and defined.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["MERGE_MODES", "MERGE_SPACES", "TTACH_MODES", "check_merge_mode", "check_merge_space", "check_temperature",
           "softmin_weights", "merge_outputs"]

#: ttach's merge modes, in ttach's order.
TTACH_MODES = ("mean", "gmean", "sum", "max", "min", "tsharpen")
MERGE_MODES = TTACH_MODES + ("weighted",)
#: What is averaged: the raw outputs, their softmax probabilities or their log-softmax.
MERGE_SPACES = ("logits", "probs", "log_probs")


def check_merge_mode(mode: object) -> str:
    if mode not in MERGE_MODES:
        raise ValueError(f"unknown merge_mode {mode!r}; valid modes: {', '.join(MERGE_MODES)}")
    return mode  # type: ignore[return-value]


def check_merge_space(space: object) -> str:
    if space not in MERGE_SPACES:
        raise ValueError(f"unknown merge_space {space!r}; valid: {', '.join(MERGE_SPACES)} (what the views' outputs "
                         f"are averaged as)")
    return space  # type: ignore[return-value]


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def softmin_weights(losses: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(-losses / temperature)`` over the last dim: per-view weights summing to 1."""
    temperature = check_temperature(temperature)
    return torch.softmax(-losses.detach() / temperature, dim=-1)


def _signed_root(x: Tensor, exponent: float) -> Tensor:
    """``sign(x) * |x| ** exponent``; equals ``x ** exponent`` bit for bit where ``x >= 0``."""
    root = x.abs() ** exponent
    return torch.where(x < 0, -root, root)


def _plain(outputs: Tensor, mode: str) -> Tensor:
    """ttach's Merger on ``outputs`` ``(B, k, ...)``: the same operations in the same order."""
    k = outputs.shape[1]
    views = outputs.unbind(1)
    if mode == "tsharpen":
        views = tuple(_signed_root(v, 0.5) for v in views)
    acc = views[0]
    for v in views[1:]:
        if mode in ("mean", "sum", "tsharpen"):
            acc = acc + v
        elif mode == "gmean":
            acc = acc * v
        elif mode == "max":
            acc = torch.max(acc, v)
        else:
            acc = torch.min(acc, v)
    if mode in ("mean", "tsharpen"):
        return acc / k
    if mode == "gmean":
        return _signed_root(acc, 1.0 / k)
    if k == 1 and mode in ("sum", "max", "min"):
        return acc.clone()  # never hand back a view of the caller's tensor
    return acc


def _weighted(outputs: Tensor, mode: str, w: Tensor) -> Tensor:
    """Weighted forms with weights ``w`` (broadcast to ``outputs``); zero-weight entries ignored."""
    used = w > 0
    zero = torch.zeros((), dtype=outputs.dtype, device=outputs.device)
    if mode in ("max", "min"):
        fill = torch.full((), float("-inf") if mode == "max" else float("inf"), dtype=outputs.dtype, device=outputs.device)
        masked = torch.where(used, outputs, fill)
        return masked.amax(1) if mode == "max" else masked.amin(1)
    w = torch.where(used, w, zero)
    den = w.sum(1)
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    if mode == "sum":
        return torch.where(used, w * outputs, zero).sum(1)
    if mode == "gmean":
        logs = torch.where(used, w * outputs.abs().log(), zero).sum(1) / safe_den
        negatives = (used & (outputs < 0)).sum(1)
        magnitude = logs.exp()
        return torch.where(negatives % 2 == 1, -magnitude, magnitude)
    values = _signed_root(outputs, 0.5) if mode == "tsharpen" else outputs
    return torch.where(used, w * values, zero).sum(1) / safe_den


def merge_outputs(
    outputs: Tensor,
    mode: str = "mean",
    losses: Optional[Tensor] = None,
    temperature: float = 1.0,
    weights: Optional[Tensor] = None,
    merge_space: str = "logits",
) -> Tensor:
    """Merge ``outputs`` ``(B, k, ...)`` over the view dim 1 -> ``(B, ...)``.

    ``losses`` ``(B, k)``: predicted losses of the views, used (and required) by ``"weighted"``
    with ``temperature``. ``weights``: optional per-element weights broadcastable to
    ``outputs`` (validity maps); see the module docstring for every mode's weighted form.

    ``merge_space``: ``"logits"`` merges the outputs as they are (ttach's behaviour);
    ``"probs"`` merges their softmax over the class dim (dim 2, ``(B, k, classes, ...)``) and
    returns the *logarithm* of the merged probabilities, so the result is still a logit-like
    vector (``softmax(result)`` is the merged probability; argmax and cross-entropy read it as
    they read logits); ``"log_probs"`` merges their log-softmax and returns that.
    """
    mode = check_merge_mode(mode)
    merge_space = check_merge_space(merge_space)
    if merge_space != "logits":
        if not isinstance(outputs, Tensor) or outputs.dim() < 3:
            raise ValueError(f"merge_space {merge_space!r} needs outputs (B, k, classes, ...), got "
                             f"{tuple(getattr(outputs, 'shape', ())) or type(outputs).__name__}")
        if not outputs.is_floating_point():
            raise TypeError(f"outputs must be floating point to be merged, got dtype {outputs.dtype}")
        if merge_space == "log_probs":
            return merge_outputs(outputs.log_softmax(2), mode, losses, temperature, weights)
        merged = merge_outputs(outputs.softmax(2), mode, losses, temperature, weights)
        return merged.clamp_min(torch.finfo(merged.dtype).tiny).log()
    if not isinstance(outputs, Tensor) or outputs.dim() < 2:
        raise ValueError(f"outputs must be a (B, k, ...) tensor, got {tuple(getattr(outputs, 'shape', ())) or type(outputs).__name__}")
    if not outputs.is_floating_point():
        raise TypeError(f"outputs must be floating point to be merged, got dtype {outputs.dtype}")
    b, k = outputs.shape[:2]
    if k == 0:
        raise ValueError(f"outputs has no views to merge (shape {tuple(outputs.shape)})")
    view_w: Optional[Tensor] = None
    if mode == "weighted":
        if losses is None:
            raise ValueError("merge_mode 'weighted' needs the views' predicted losses (losses=, shape (B, k))")
        if not isinstance(losses, Tensor) or losses.shape != (b, k) or not losses.is_floating_point():
            raise ValueError(f"losses must be a float tensor of shape (B, k) = {(b, k)}, got "
                             f"{getattr(losses, 'dtype', type(losses).__name__)} {tuple(getattr(losses, 'shape', ()))}")
        view_w = softmin_weights(losses.to(outputs.dtype), temperature)
        view_w = view_w.reshape((b, k) + (1,) * (outputs.dim() - 2))
    elif losses is not None:
        raise ValueError(f"losses= is only used by merge_mode 'weighted', not {mode!r}")
    if weights is not None:
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a tensor broadcastable to outputs {tuple(outputs.shape)}, got {type(weights).__name__}")
        try:
            shape = torch.broadcast_shapes(weights.shape, outputs.shape)
        except RuntimeError:
            shape = None
        if shape != outputs.shape or weights.dim() != outputs.dim():
            raise ValueError(f"weights {tuple(weights.shape)} must have outputs' rank and broadcast to outputs "
                             f"{tuple(outputs.shape)}, e.g. (B, k, 1, H, W) validity maps")
        weights = weights.to(outputs.dtype)
    if weights is None and view_w is None:
        return _plain(outputs, mode)
    if view_w is not None and weights is None:
        return (view_w * outputs).sum(1)
    w = weights if view_w is None else weights * view_w
    merged = _weighted(outputs, mode, w)
    fallback = _weighted(outputs, mode, view_w.expand_as(outputs)) if view_w is not None else _plain(outputs, mode)
    covered = (w > 0).any(1)
    return torch.where(covered, merged, fallback)
