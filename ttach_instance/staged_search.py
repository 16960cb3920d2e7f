"""Dufour's staged search for a fixed policy of ``budget`` forward passes (the original included).

"How to correctly use test-time augmentation" chooses a small fixed set of deterministic
augmentations in stages rather than over every subset of a large pool:

a. **magnitude sweep**: every op family (the candidates whose ops are the same op chain with other
   parameters: ``rotate(-20)``, ``rotate(20)``...) is swept paired with the original -- each
   member scored as the policy ``{identity, member}`` -- and only its best member is kept;
b. **combinations**: the best policy of ``budget`` candidates among the original and the family
   winners (:func:`~ttach_instance.search.budget_policy_search`: exhaustive when the subsets are
   few, greedy otherwise);
c. **composites**: pairs of winners composed into one candidate (``hflip`` then ``translate``:
   one view) join the winners, and the best policy is chosen again among all of them.

Stages (a) and (b) are tensor work on a prediction cache (``log_probs`` ``(candidates, samples,
classes)``, as in :mod:`ttach_instance.search`). Composites are not in the cache: stage (c) asks
``composite_log_probs(pairs)`` for their log-probabilities (the CLI runs the model through a
second prediction cache), so this module never calls a model. Scores are those of
:func:`~ttach_instance.search.budget_policy_search`: accuracy of the mean probability (ties by
its NLL) or its NLL alone.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .search import (CHUNK_ELEMENTS, OBJECTIVES, SearchResult, _better, _budget_scores, _check_inputs,
                     budget_policy_search)
from .selection import check_positive_int

__all__ = ["op_families", "composite_specs", "staged_budget_search"]

#: ``composite_log_probs(pairs)``: ``(len(pairs), samples, classes)`` log-probabilities of the
#: composites, composite ``(i, j)`` being candidate ``i``'s ops followed by candidate ``j``'s.
CompositeFn = Callable[[List[Tuple[int, int]]], Tensor]


def op_families(specs: Sequence[Dict[str, Any]]) -> List[Optional[str]]:
    """The family of each candidate spec (``{"name", "ops": [{"op": ...}, ...]}``, as a prediction
    cache's manifest records them): its op names joined by ``+`` (``"rotate"``,
    ``"hflip+translate"``), ``None`` for a candidate without ops (the original)."""
    out: List[Optional[str]] = []
    for i, spec in enumerate(specs):
        ops = spec.get("ops") if isinstance(spec, dict) else None
        if not isinstance(ops, list) or not all(isinstance(o, dict) and isinstance(o.get("op"), str) for o in ops):
            raise ValueError(f"specs[{i}] must be a candidate spec {{'name': ..., 'ops': [{{'op': ...}}, ...]}}, "
                             f"got {spec!r}")
        out.append("+".join(o["op"] for o in ops) if ops else None)
    return out


def composite_specs(specs: Sequence[Dict[str, Any]], pairs: Sequence[Tuple[int, int]]) -> List[Dict[str, Any]]:
    """Candidate specs of the composites ``(i, j)``: named ``"<name i>+<name j>"``, the ops of
    ``specs[i]`` followed by those of ``specs[j]``."""
    return [{"name": f"{specs[i]['name']}+{specs[j]['name']}", "ops": list(specs[i]["ops"]) + list(specs[j]["ops"])}
            for i, j in pairs]


def _key(probs: Tensor, y: Tensor, members: Sequence[int]) -> Tuple[int, float]:
    correct, nll = _budget_scores(probs[list(members)].sum(0, keepdim=True), y, len(members))
    return int(correct[0]), float(nll[0])


def _score(key: Tuple[int, float], samples: int, objective: str) -> float:
    return key[0] / samples if objective == "accuracy" else key[1]


def staged_budget_search(log_probs: Tensor, labels: Tensor, budget: int, families: Sequence[Optional[str]],
                         identity: int = 0, objective: str = "accuracy",
                         composite_log_probs: Optional[CompositeFn] = None, composite_pool: Optional[int] = None,
                         exhaustive_limit: int = 20_000, chunk_elements: int = CHUNK_ELEMENTS) -> SearchResult:
    """Dufour's staged fixed policy of ``budget`` candidates that contains ``identity``.

    ``families[c]``: candidate ``c``'s op family (:func:`op_families`); ``None`` leaves it out of
    the sweep (the original, or anything not to use). ``composite_log_probs``: stage (c)'s source
    of composite predictions (``None``: no stage (c)); ``composite_pool``: compose pairs among the
    best that many family winners by their stage-(a) score (``None``: all winners).

    Stage (a) keeps, per family, the member whose policy ``{identity, member}`` scores best (ties
    to the lowest index). Stages (b) and (c) are :func:`~ttach_instance.search.budget_policy_search`
    over the original and the winners, then also the composites of pairs ``(i, j)`` of winners
    (``i < j``, pool order: ``i``'s ops first). The chosen policy is stage (c)'s unless stage (b)'s
    scores strictly better (possible only when greedy ran), or stage (b)'s when (c) did not run.

    Returns a :class:`~ttach_instance.search.SearchResult` (``method="staged"``) whose indices
    count composites after the pool: composite ``k`` is index ``candidates + k``, and
    ``details["composites"]`` lists their pairs. ``details["stages"]`` holds each stage's
    candidates, scores and choice (``scores``: the objective, accuracy as a fraction or mean NLL).
    A ``budget`` larger than the candidates the stages can reach is refused before any work.
    """
    lp, y = _check_inputs(log_probs, labels)
    c, samples, _ = lp.shape
    budget = check_positive_int(budget, "budget")
    if isinstance(identity, bool) or not isinstance(identity, int) or not 0 <= identity < c:
        raise ValueError(f"identity must be a candidate index in 0..{c - 1}, got {identity!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if not isinstance(families, Sequence) or isinstance(families, (str, bytes)) or len(families) != c \
            or not all(f is None or (isinstance(f, str) and f) for f in families):
        raise ValueError(f"families must give each of the {c} candidates a family name or None, got {families!r}")
    if composite_log_probs is not None and not callable(composite_log_probs):
        raise TypeError(f"composite_log_probs must be callable (pairs) -> log-probs, got {composite_log_probs!r}")
    if composite_pool is not None:
        composite_pool = check_positive_int(composite_pool, "composite_pool")
    chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
    probs = lp.exp()

    # (a) magnitude sweep: each member paired with the original
    members: Dict[str, List[int]] = {}
    for i, f in enumerate(families):
        if f is not None and i != identity:
            members.setdefault(f, []).append(i)
    sweep: Dict[str, Dict[str, Any]] = {}
    winner_keys: Dict[int, Tuple[int, float]] = {}
    for f, idx in members.items():
        keys = [_key(probs, y, [identity, i]) for i in idx]
        best = 0
        for j in range(1, len(keys)):
            if _better(keys[j], keys[best], objective):
                best = j
        sweep[f] = {"candidates": idx, "scores": [_score(k, samples, objective) for k in keys], "winner": idx[best]}
        winner_keys[idx[best]] = keys[best]
    winners = sorted(winner_keys)
    ranked = sorted(winners, key=lambda i: (-winner_keys[i][0], winner_keys[i][1], i) if objective == "accuracy"
                    else (winner_keys[i][1], i))
    composers = sorted(ranked[:composite_pool]) if composite_pool is not None else winners
    pairs = list(itertools.combinations(composers, 2)) if composite_log_probs is not None else []
    reachable = 1 + len(winners) + len(pairs)
    if budget > reachable:
        raise ValueError(f"budget must be at most the {reachable} candidates the stages choose among (the original, "
                         f"{len(winners)} family winners and {len(pairs)} composites), got {budget}")

    def choose(pool: List[int], sub: Tensor) -> Tuple[List[int], Tuple[int, float], str]:
        res = budget_policy_search(sub, y, min(budget, len(pool)), identity=0, objective=objective,
                                   exhaustive_limit=exhaustive_limit, chunk_elements=chunk_elements)
        chosen = [pool[i] for i in res.indices]
        return chosen, _key(sub.exp(), y, res.indices), res.method

    # (b) combinations of the winners
    pool_b = [identity] + winners
    chosen_b, key_b, method_b = choose(pool_b, lp[pool_b])
    stages: Dict[str, Any] = {
        "sweep": sweep,
        "combinations": {"pool": pool_b, "indices": chosen_b, "score": _score(key_b, samples, objective),
                         "method": method_b},
    }
    chosen, all_probs = chosen_b, probs
    # (c) composites of pairs of winners, competing with the winners
    if pairs:
        extra = composite_log_probs(pairs)
        if not isinstance(extra, Tensor) or extra.dim() != 3 or tuple(extra.shape) != (len(pairs), samples, lp.shape[2]):
            raise ValueError(f"composite_log_probs must return log-probs ({len(pairs)}, {samples}, {lp.shape[2]}) for "
                             f"{len(pairs)} composites, got {tuple(getattr(extra, 'shape', ())) or type(extra).__name__}")
        try:
            extra, _ = _check_inputs(extra.to(lp.device), y)
        except ValueError as e:
            raise ValueError(f"composite_log_probs returned bad values: {e}") from None
        pool_c = pool_b + [c + k for k in range(len(pairs))]
        chosen_c, key_c, method_c = choose(pool_c, torch.cat([lp[pool_b], extra]))
        stages["composites"] = {"pairs": [list(p) for p in pairs], "pool": pool_c, "indices": chosen_c,
                                "score": _score(key_c, samples, objective), "method": method_c}
        if len(chosen_b) < budget or not _better(key_b, key_c, objective):  # (c) reaches the budget (checked)
            chosen = chosen_c
        all_probs = torch.cat([probs, extra.exp()])
    final = "composites" if chosen is not chosen_b else "combinations"
    scores = [_score(_key(all_probs, y, chosen[:m]), samples, objective) for m in range(1, len(chosen) + 1)]
    details = {"stages": stages, "final_stage": final, "composites": [list(p) for p in pairs], "identity": identity,
               "families": sorted(members), "exhaustive_limit": exhaustive_limit, "composite_pool": composite_pool}
    return SearchResult(chosen, scores, [1.0] * len(chosen), objective, "staged", details)
