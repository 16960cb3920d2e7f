"""A fitted predictor's held-out k=1 gain over the identity: what every fit reports at its end.

On the held-out fold, the k=1 accuracy of the fitted (calibrated) predictor's choice minus the
identity's, in points, on all rows, clean rows and corrupted rows (the label cache's
``corruption < 0``), with a standard error clustered by image (the rows of one image are not
independent draws). Why: the number a user needs to see whether the fit buys anything, and the
unit of the learning curve (:mod:`ttach_instance.training.curve`).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor

__all__ = ["SPLITS", "heldout_gain", "gain_record", "format_gain", "clustered_se"]

#: The splits every gain is reported on.
SPLITS = ("all", "clean", "corrupted")


def clustered_se(values: Tensor, clusters: Optional[Tensor]) -> float:
    """Standard error of ``values.mean()`` with rows of one cluster (image) summed before the
    variance (the cluster-robust sandwich; independent rows when ``clusters`` is None)."""
    n = values.numel()
    if n < 2:
        return float("nan")
    centred = values.double() - values.double().mean()
    if clusters is None:
        return float(centred.std() / math.sqrt(n))
    ids, inverse = torch.unique(clusters, return_inverse=True)
    sums = torch.zeros(ids.numel(), dtype=torch.float64).index_add_(0, inverse, centred)
    g = ids.numel()
    if g < 2:
        return float("nan")
    return float(math.sqrt(g / (g - 1) * float(sums.square().sum())) / n)


def heldout_gain(scores: Tensor, correct: Tensor, identity: int, clean: Optional[Tensor] = None,
                 image_ids: Optional[Tensor] = None) -> Dict:
    """The k=1 accuracy gain over the identity of a predictor's ``scores`` ``(N, T)`` on held-out rows.

    ``scores``: the fitted predictor's output (its calibration included; k=1 takes the ``argmin``),
    ``correct`` ``(N, T)`` per-candidate correctness (0/1, or a pixel accuracy), ``identity`` the
    identity candidate's index, ``clean`` ``(N,)`` bool (rows without a corruption; ``None``: only
    ``all`` is reported), ``image_ids`` ``(N,)`` for the clustered standard errors. Returns
    ``{"identity", split: {"rows", "k1_accuracy", "identity_accuracy", "gain_points", "se_points"},
    ..., "row_gains": (N,) float64 tensor}`` (``row_gains``: correct[choice] - correct[identity]
    per row, what :func:`~ttach_instance.training.curve.verdict` pairs).
    """
    if correct.dim() != 2 or tuple(correct.shape) != tuple(scores.shape):
        raise ValueError(f"correct must be (N, T) like scores {tuple(scores.shape)}, got {tuple(correct.shape)}")
    if not 0 <= identity < correct.shape[1]:
        raise ValueError(f"identity must be a candidate index in [0, {correct.shape[1]}), got {identity}")
    c = correct.double()  # means of many 0/1 rows: float32 would be off in the 8th digit
    choice = scores.argmin(1)
    chosen = c.gather(1, choice[:, None]).squeeze(1)
    kept = c[:, identity]
    out: Dict = {"identity": int(identity), "row_gains": chosen - kept}
    masks = {"all": torch.ones(c.shape[0], dtype=torch.bool)}
    if clean is not None:
        masks.update(clean=clean.bool(), corrupted=~clean.bool())
    for split, m in masks.items():
        if not m.any():
            out[split] = {"rows": 0}
            continue
        d = (chosen - kept)[m]
        out[split] = {"rows": int(m.sum()), "k1_accuracy": float(chosen[m].mean()),
                      "identity_accuracy": float(kept[m].mean()), "gain_points": 100 * float(d.mean()),
                      "se_points": 100 * clustered_se(d, None if image_ids is None else image_ids[m])}
    return out


def gain_record(gain: Dict) -> Dict:
    """``gain`` without its per-row tensor (what history.json and the curve's JSON hold)."""
    return {k: v for k, v in gain.items() if k != "row_gains"}


def format_gain(gain: Dict) -> str:
    """One line: the gain on all held-out rows (k=1 vs identity accuracy), then clean and corrupted."""
    a = gain["all"]
    line = (f"held-out k=1 gain over the identity: {a['gain_points']:+.2f} points ({100 * a['k1_accuracy']:.2f} % vs "
            f"{100 * a['identity_accuracy']:.2f} %, {a['rows']:,} rows)")
    parts = [f"{s} {gain[s]['gain_points']:+.2f} ({gain[s]['rows']:,} rows)" for s in ("clean", "corrupted")
             if s in gain and gain[s].get("rows")]
    return line + ("; " + ", ".join(parts) if parts else "")
