"""Ranking objectives and metrics for loss predictors.

Convention: both predictions and targets are *losses* ``(B, T)`` — lower is better.

* :func:`listwise_kl` — KL(softmin(true / tau) || softmin(pred)), the paper's target.
* :func:`soft_rank` / :func:`spearman_loss` — differentiable Spearman through a pairwise
  sigmoid soft rank: ``rank_i = 1 + sum_{j != i} sigmoid((x_i - x_j) / t)`` (-> the exact
  ascending rank as ``t -> 0``).
* :func:`ranking_metrics` — Spearman correlation, top-1 hit rate, regret, k=1 accuracy.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor


def _check_pair(pred: Tensor, true: Tensor) -> None:
    if not isinstance(pred, Tensor) or not isinstance(true, Tensor):
        raise TypeError("pred and true must be tensors of shape (B, T)")
    if pred.dim() != 2 or pred.shape != true.shape:
        raise ValueError(f"pred and true must both have shape (B, T), got {tuple(pred.shape)} and {tuple(true.shape)}")


def soft_rank(x: Tensor, temperature: float = 0.1) -> Tensor:
    """Ascending soft rank along the last dim (1 = smallest)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    diff = (x.unsqueeze(-1) - x.unsqueeze(-2)) / temperature  # [..., i, j] = (x_i - x_j) / t
    return 0.5 + torch.sigmoid(diff).sum(-1)  # the j = i term adds sigmoid(0) = 0.5


def hard_rank(x: Tensor) -> Tensor:
    """Ascending rank (1 = smallest) with ties given their average rank."""
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).to(torch.float64).sum(-1)
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).to(torch.float64).sum(-1)
    return (less + (equal + 1) / 2).to(x.dtype if x.is_floating_point() else torch.float32)


def _pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def spearman_loss(pred: Tensor, true: Tensor, temperature: float = 0.1) -> Tensor:
    """``1 - mean Spearman(soft_rank(pred), rank(true))``; differentiable in ``pred``."""
    _check_pair(pred, true)
    scale = pred.detach().std(-1, keepdim=True).clamp_min(1e-6)
    return (1 - _pearson(soft_rank(pred / scale, temperature), hard_rank(true.detach()))).mean()


def listwise_kl(pred: Tensor, true: Tensor, tau: float = 1.0) -> Tensor:
    """``KL(softmax(-true / tau) || softmax(-pred))`` averaged over the batch."""
    _check_pair(pred, true)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    target = torch.softmax(-true.detach().float() / tau, -1)
    log_q = torch.log_softmax(-pred.float(), -1)
    return (target * (torch.log(target.clamp_min(1e-12)) - log_q)).sum(-1).mean()


def tau_from_spread(losses: Tensor) -> float:
    """A listwise temperature for losses of this scale: half the median per-row standard deviation.

    ``softmin(losses / tau)`` is only informative when ``tau`` is of the order of the differences
    within a row: the paper's ``tau = 1`` suits per-image cross-entropy (differences of nats),
    but mean-pixel segmentation losses differ by hundredths between views, where ``tau = 1``
    makes the target uniform (what z-scoring each row would do, up to the factor).
    """
    if not isinstance(losses, Tensor) or losses.dim() != 2 or losses.shape[1] < 2:
        raise ValueError(f"losses must be a (N, T) tensor with T >= 2, got {getattr(losses, 'shape', type(losses))}")
    tau = 0.5 * float(losses.float().std(1).median())
    if not tau > 0:
        raise ValueError("losses have no spread within rows (every candidate equal): no temperature fits them")
    return tau


def ranking_loss(pred: Tensor, true: Tensor, listwise_weight: float = 1.0, spearman_weight: float = 1.0,
                 tau: float = 1.0, temperature: float = 0.1) -> Tensor:
    loss = pred.new_zeros(())
    if listwise_weight:
        loss = loss + listwise_weight * listwise_kl(pred, true, tau)
    if spearman_weight:
        loss = loss + spearman_weight * spearman_loss(pred, true, temperature)
    return loss


def spearman(pred: Tensor, true: Tensor) -> Tensor:
    """Per-sample Spearman rank correlation ``(B,)`` (average ranks for ties)."""
    _check_pair(pred, true)
    return _pearson(hard_rank(pred.double()), hard_rank(true.double()))


@torch.no_grad()
def ranking_metrics(pred: Tensor, true: Tensor, correct: Optional[Tensor] = None) -> Dict[str, float]:
    """Held-out metrics of predicted vs true per-candidate losses.

    spearman: mean per-sample rank correlation; top1_hit: predicted best is a true best;
    regret: true loss of the predicted best minus the oracle's (mean); with ``correct``
    ``(B, T)`` also k=1 accuracy of the predicted best, of candidate 0 (identity) and of the oracle.
    """
    _check_pair(pred, true)
    choice = pred.argmin(-1)
    chosen = true.gather(1, choice[:, None]).squeeze(1)
    best = true.min(-1).values
    out = {
        "spearman": float(torch.nan_to_num(spearman(pred, true)).mean()),
        "top1_hit": float((chosen <= best).float().mean()),
        "regret": float((chosen - best).mean()),
        "n": int(pred.shape[0]),
    }
    if correct is not None:
        c = correct.float()
        out["k1_accuracy"] = float(c.gather(1, choice[:, None]).mean())
        out["identity_accuracy"] = float(c[:, 0].mean())
        out["oracle_accuracy"] = float(c.gather(1, true.argmin(-1)[:, None]).mean())
    return out
