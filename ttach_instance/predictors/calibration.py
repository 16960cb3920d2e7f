"""The identity calibration: a module applied after a predictor's ranking head.

Small predicted differences on clean images are mostly noise, so a fitted predictor keeps the
identity unless another candidate is predicted clearly better: the identity's score is lowered
by ``margin`` (constant) or by ``margin * p_clean`` (gated: ``p_clean = sigmoid(w . f + b)``, a
logistic regression on the predictor's features estimating that the image is uncorrupted, so
clean-looking images keep the identity and corrupted ones get the plain ranking).

The calibration is its own module with its own tensors (``calibration.margin``,
``calibration.gate_weight``, ``calibration.gate_bias``); nothing is folded into the head, so
``predictor.calibration = None`` is exactly the uncalibrated ranking.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["IdentityCalibration", "calibrate_identity_margin", "fit_identity_calibration", "identity_index"]


class IdentityCalibration(nn.Module):
    """``scores -> scores - margin * g * e_identity`` with ``g = 1`` (constant) or, when
    ``num_features`` is given, ``g = sigmoid(gate_weight . features + gate_bias)`` per image."""

    def __init__(self, identity: int, margin: float = 0.0, num_features: Optional[int] = None):
        super().__init__()
        if isinstance(identity, bool) or not isinstance(identity, int) or identity < 0:
            raise ValueError(f"identity must be a candidate index >= 0, got {identity!r}")
        if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)
                                         or num_features < 1):
            raise ValueError(f"num_features must be a positive int (the gate reads the features), got {num_features!r}")
        self.identity = identity
        self.register_buffer("margin", torch.tensor(float(margin)))
        self.gated = num_features is not None
        if self.gated:
            self.register_buffer("gate_weight", torch.zeros(num_features))
            self.register_buffer("gate_bias", torch.zeros(()))

    def config(self) -> Dict[str, object]:
        """What rebuilds this module before its tensors are loaded (saved in checkpoint metadata)."""
        return {"identity": self.identity,
                "num_features": int(self.gate_weight.numel()) if self.gated else None}

    def clean_probability(self, features: Tensor) -> Tensor:
        """``(B,)``: how likely each image is uncorrupted (1 everywhere without a gate)."""
        if not self.gated:
            return features.new_ones(features.shape[0], dtype=torch.float32)
        return torch.sigmoid(features.float() @ self.gate_weight.float() + self.gate_bias.float())

    def forward(self, scores: Tensor, features: Tensor) -> Tensor:
        if self.identity >= scores.shape[1]:
            raise ValueError(f"calibration identity {self.identity} is outside the {scores.shape[1]} candidates")
        shift = torch.zeros_like(scores)
        shift[:, self.identity] = self.margin.to(scores.dtype) * self.clean_probability(features).to(scores.dtype)
        return scores - shift

    def extra_repr(self) -> str:
        return f"identity={self.identity}, margin={float(self.margin):.4g}, gated={self.gated}"


def identity_index(space) -> Optional[int]:
    """Which candidate of ``space`` is the identity; ``None`` when it has none (crop spaces)."""
    return next((i for i, candidate in enumerate(space) if candidate.is_identity), None)


def calibrate_identity_margin(pred: Tensor, correct: Tensor, clean: Tensor, tolerance: float = 0.0,
                              identity: int = 0, grid: Optional[Sequence[float]] = None,
                              gate: Optional[Tensor] = None) -> Tuple[float, Dict[str, float]]:
    """Margin ``m`` >= 0 such that choosing ``argmin(pred - m * g * e_identity)`` maximises held-out
    k=1 accuracy while accuracy on clean rows stays >= identity's clean accuracy - ``tolerance``
    points; ``g`` is 1, or per row the ``gate`` ``(N,)`` clean probability. Ties prefer the
    smaller margin. Returns ``(margin, info)``."""
    if grid is None:
        spread = float((pred.max(1).values - pred.min(1).values).median())
        factors = (0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0)
        if gate is not None:  # a gated margin is scaled down by the gate: larger ones can still matter
            factors += (3.0, 4.0, 6.0, 8.0)
        grid = [spread * f for f in factors + (100.0,)]
    scale = 1.0 if gate is None else gate.float()
    c = correct.float()
    id_clean = float(c[clean, identity].mean()) if clean.any() else 0.0
    best = None
    for m in grid:
        q = pred.clone()
        q[:, identity] -= m * scale
        acc = c.gather(1, q.argmin(1, keepdim=True)).squeeze(1)
        clean_acc = float(acc[clean].mean()) if clean.any() else 1.0
        ok = clean_acc >= id_clean - tolerance / 100
        cand = (ok, float(acc.mean()), -m)
        if best is None or cand > best[0]:
            best = (cand, m, {"accuracy": float(acc.mean()), "clean": clean_acc, "identity_clean": id_clean})
    return float(best[1]), best[2]


def fit_gate(features: Tensor, clean: Tensor) -> Tuple[Tensor, Tensor]:
    """``(weight (F,), bias ())`` of an L2-regularised logistic regression ``clean ~ features``,
    fitted on standardised features and folded back to raw ones (float32)."""
    x, y = features.double(), clean.double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + 1e-4 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (w / std).float(), (b - (w * mean / std).sum()).float()


@torch.no_grad()
def fit_identity_calibration(predictor: nn.Module, val_features: Tensor, val_correct: Tensor, val_clean: Tensor,
                             tolerance: float, train_features: Optional[Tensor] = None,
                             train_clean: Optional[Tensor] = None) -> Dict[str, float]:
    """Give ``predictor`` (a :class:`~ttach_instance.predictors.base.LossPredictorBase`) a fitted
    :class:`IdentityCalibration`, replacing any it had.

    ``val_*``: the held-out fold's features ``(N, F)``, per-candidate correctness ``(N, T)`` and
    clean flags ``(N,)``, on which the margin is calibrated (:func:`calibrate_identity_margin`).
    With ``train_features``/``train_clean`` the margin is gated by a logistic regression fitted on
    those rows (needs clean and corrupted rows). Returns calibrate's info plus ``margin`` and, when
    gated, ``gate_accuracy`` (how often the gate tells clean from corrupted on the held-out rows).
    Raises ``ValueError`` when the predictor's space has no identity candidate.
    """
    identity = identity_index(predictor.space)
    if identity is None:
        raise ValueError(f"space {predictor.space.name!r} has no identity candidate: nothing to calibrate")
    gated = train_features is not None
    predictor.calibration = None
    calibration = IdentityCalibration(identity, 0.0, val_features.shape[1] if gated else None)
    if gated:
        train_clean = train_clean.bool()
        if train_clean.all() or not train_clean.any():
            raise ValueError("a gated calibration needs clean and corrupted training rows (labels made with "
                             "corruption_p strictly between 0 and 1)")
        weight, bias = fit_gate(train_features, train_clean)
        calibration.gate_weight.copy_(weight)
        calibration.gate_bias.copy_(bias)
    p_val = calibration.clean_probability(val_features) if gated else None
    scores = predictor.head_scores(val_features.to(_device(predictor))).float().cpu()
    margin, info = calibrate_identity_margin(scores, val_correct, val_clean.bool(), tolerance, identity, gate=p_val)
    calibration.margin.fill_(margin)
    info["margin"] = float(calibration.margin)  # the float32 value the predictor applies, as saved
    if gated:
        info["gate_accuracy"] = float(((p_val > 0.5) == val_clean.bool()).float().mean())
    predictor.calibration = calibration.to(_device(predictor))
    return info


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))
