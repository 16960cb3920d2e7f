"""Choosing candidates: pure functions on tensors, no host synchronisation.

Every selector returns a ``(B, k)`` LongTensor of candidate indices on the scores' (or the
requested) device, best first. Validation reads only shapes and dtypes (host metadata), never
values, so the functions can run inside a forward on an accelerator without a sync.

* :func:`select_topk` -- the ``k`` lowest predicted losses (the paper's greedy top-k); ties go
  to the lower candidate index (a stable sort), so the choice is deterministic.
* :func:`select_oracle` -- the same on the *true* per-candidate losses (the upper bound).
* :func:`select_random` -- ``k`` distinct candidates per row, uniformly, reproducible by seed.

NaN scores sort after every number (they are treated as the worst candidates).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

__all__ = ["check_k", "select_topk", "select_oracle", "select_random"]


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as a positive int (bools refused), or a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_k(k: object, num_candidates: int, space_name: Optional[str] = None) -> int:
    """``k`` as an int in ``[1, num_candidates]``, or a ``ValueError``/``TypeError`` naming both."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int (how many candidates to apply per sample), got {k!r}")
    if not 1 <= k <= num_candidates:
        where = f"the space {space_name!r} has" if space_name is not None else "there are"
        raise ValueError(f"k={k} but {where} {num_candidates} candidates; k must be in [1, {num_candidates}]")
    return k


def _check_scores(scores: object, name: str) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a (B, T) tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T) (one value per sample and candidate), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {scores.dtype}")
    return scores


def _lowest(scores: Tensor, k: int, name: str) -> Tensor:
    scores = _check_scores(scores, name)
    k = check_k(k, scores.shape[1])
    # A stable ascending sort: equal scores keep their candidate order (lower index first).
    # detach(): selection is a discrete choice and never carries a gradient.
    return torch.sort(scores.detach(), dim=1, stable=True).indices[:, :k]


def select_topk(scores: Tensor, k: int) -> Tensor:
    """Indices ``(B, k)`` of the ``k`` lowest predicted losses per row, lowest first.

    ``scores``: ``(B, T)`` floating point, lower = better (a loss predictor's output). Ties are
    broken by candidate index (lower first); NaN sorts last.
    """
    return _lowest(scores, k, "scores")


def select_oracle(true_losses: Tensor, k: int) -> Tensor:
    """Indices ``(B, k)`` of the ``k`` lowest *true* per-candidate losses, lowest first (ties:
    lower index first). The paper's oracle: it needs the labels, so it is an upper bound."""
    return _lowest(true_losses, k, "true_losses")


def select_random(
    batch_size: int,
    num_candidates: int,
    k: int,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
) -> Tensor:
    """``k`` distinct candidates per row drawn uniformly (without replacement): ``(B, k)``.

    Randomness comes from ``generator`` (advanced by the call: successive calls differ) or from
    a fresh generator seeded with ``seed`` (the same seed gives the same draw); give at most one.
    With neither, torch's global RNG of the device is used. The draw happens on the generator's
    device (CPU for a seed) and the result is moved to ``device`` (default: that device), so a
    seed gives the same choices whatever the target device.
    """
    for name, value in (("batch_size", batch_size), ("num_candidates", num_candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "batch_size" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'batch_size' else 'positive'} int, got {value!r}")
    k = check_k(k, num_candidates)
    if generator is not None and seed is not None:
        raise ValueError("give either generator= or seed=, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        generator = torch.Generator().manual_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    draw_device = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    noise = torch.rand(batch_size, num_candidates, generator=generator, device=draw_device)
    index = noise.argsort(dim=1, stable=True)[:, :k]
    if device is not None:
        index = index.to(device)
    return index
