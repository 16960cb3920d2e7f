"""Policy search over cached predictions: Greedy Policy Search and the best fixed policy for a budget.

Both searches read one tensor, ``log_probs`` ``(candidates, samples, classes)``: the user's
model's log-softmax output on every validation sample under every candidate of a pool (see
:mod:`ttach_instance.training.predictions`), and ``labels`` ``(samples,)``. They are pure
tensor work -- no model is called -- so a search over a 100-candidate pool runs in seconds.

* :func:`greedy_policy_search` -- GPS (Molchanov et al., UAI 2020): greedy forward selection
  *with replacement*; step ``m`` adds the candidate that maximises the validation
  log-likelihood of the temperature-scaled log-mean-softmax ensemble of the ``m`` members.
* :func:`budget_policy_search` -- a fixed deterministic subset of ``budget`` distinct
  candidates that always contains the original image (Dufour, "How to correctly use
  test-time augmentation"), best by accuracy or NLL of the mean probability: exhaustive when
  the subsets are few, greedy otherwise.
* :func:`fit_temperature` -- the temperature fit both use, batched over ensembles.

Dufour's staged procedure (sweep, combinations, composites) builds on the budget search in
:mod:`ttach_instance.staged_search`.

Everything is computed in float64 on ``log_probs``' device; inputs are renormalised with
``log_softmax`` first (float16 caches do not sum to exactly one).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .selection import check_positive_int

__all__ = ["SearchResult", "fit_temperature", "greedy_policy_search", "budget_policy_search", "OBJECTIVES",
           "POLICY_FORMAT", "policy_document"]

#: Objectives of :func:`budget_policy_search` (``"accuracy"``: higher is better; ``"nll"``: lower).
OBJECTIVES = ("accuracy", "nll")
#: Default temperature bracket of the fit (GPS's Nelder-Mead is unbounded; a bracket keeps a
#: perfectly separated validation set from sending ``T`` to 0).
TEMPERATURE_BOUNDS = (1e-2, 1e2)
#: Scores within this relative distance of the best are ties, won by the lowest index: the
#: order of a floating-point sum must not decide between two equal candidates.
TIE_TOLERANCE = 1e-12
#: Elements of one batched ``(chunk, samples, classes)`` evaluation (float64: 32 MiB).
CHUNK_ELEMENTS = 1 << 22


@dataclass
class SearchResult:
    """What a search chose, in order.

    ``indices``: candidate indices (GPS may repeat one). ``scores[i]``: the validation score of
    the first ``i + 1`` members (``objective``: ``"log_likelihood"`` mean per sample, higher is
    better; ``"accuracy"`` fraction correct; ``"nll"`` mean negative log-likelihood, lower is
    better). ``temperatures[i]``: the temperature the ``i + 1``-member ensemble was scored at
    (1.0: unscaled). ``method``: ``"greedy"`` or ``"exhaustive"``.
    """

    indices: List[int]
    scores: List[float]
    temperatures: List[float]
    objective: str = "log_likelihood"
    method: str = "greedy"
    details: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- validation
def _check_inputs(log_probs: Any, labels: Any) -> Tuple[Tensor, Tensor]:
    """``(log_probs float64 renormalised, labels int64)`` on ``log_probs``' device, or an error
    naming the argument."""
    if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point():
        raise TypeError(f"log_probs must be a floating-point tensor (candidates, samples, classes), got "
                        f"{getattr(log_probs, 'dtype', type(log_probs).__name__)}")
    if log_probs.dim() != 3 or min(log_probs.shape) < 1:
        raise ValueError(f"log_probs must have shape (candidates, samples, classes) with every size >= 1, got "
                         f"{tuple(log_probs.shape)}")
    if log_probs.shape[2] < 2:
        raise ValueError(f"log_probs must have at least 2 classes, got shape {tuple(log_probs.shape)}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (samples,), got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    c, n, k = log_probs.shape
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) (one class per sample of log_probs), got {tuple(labels.shape)}")
    labels = labels.to(device=log_probs.device, dtype=torch.long)
    bad = (labels < 0) | (labels >= k)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"labels must be class indices in 0..{k - 1}, got {int(labels[i])} at sample {i}")
    lp = log_probs.double()
    finite = torch.isfinite(lp)
    if not bool(finite.all()):
        where = tuple(int(v) for v in (~finite).nonzero()[0])
        raise ValueError(f"log_probs must be finite, got {float(lp[where])} at (candidate, sample, class) {where}")
    total = torch.logsumexp(lp, dim=2)
    worst = float(total.abs().max())
    if worst > 1e-2:  # float16 storage is within ~1e-3
        raise ValueError(f"log_probs must be log-probabilities (log_softmax over classes: each row's logsumexp is 0), "
                         f"got a row whose logsumexp is {worst:.3g} away from 0; pass log_softmax of the logits")
    return lp - total.unsqueeze(2), labels


def _check_temperature(temperature: Any, bounds: Any) -> Tuple[Union[str, float, None], Tuple[float, float]]:
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            and 0 < bounds[0] < bounds[1] < math.inf):
        raise ValueError(f"temperature_bounds must be two finite numbers 0 < low < high, got {bounds!r}")
    if temperature is None or temperature == "fit":
        return temperature, (float(bounds[0]), float(bounds[1]))
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be 'fit', None (unscaled) or a finite number > 0, got {temperature!r}")
    return float(temperature), (float(bounds[0]), float(bounds[1]))


def _chunks(count: int, per_item: int, chunk_elements: int) -> List[slice]:
    step = max(1, chunk_elements // max(1, per_item))
    return [slice(i, min(count, i + step)) for i in range(0, count, step)]


def _argbest(scores: Tensor, higher: bool = True) -> int:
    """Lowest index among the scores within :data:`TIE_TOLERANCE` of the best."""
    best = scores.max() if higher else scores.min()
    tol = TIE_TOLERANCE * max(1.0, abs(float(best)))
    close = (scores >= best - tol) if higher else (scores <= best + tol)
    return int(close.nonzero()[0])


# ----------------------------------------------------------------------------- temperature
def _centred(z: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """``(w, w_y)``: ``z`` ``(B, N, K)`` shifted so every row's largest value is 0 (for any
    ``beta > 0`` the largest of ``beta z`` sits at the same class, so ``exp(beta w) <= 1``), and
    its value at each sample's label ``(B, N)``. Softmax and NLL are unchanged by the shift."""
    w = z - z.amax(2, keepdim=True)
    return w, w.gather(2, y.view(1, -1, 1).expand(w.shape[0], -1, 1)).squeeze(2)


def _scaled_log_likelihood(w: Tensor, wy: Tensor, beta: Tensor) -> Tensor:
    """Mean over samples of ``log_softmax(beta * w)[y]`` per row ``(B,)``, from :func:`_centred`."""
    b = beta.to(w.dtype).view(-1, 1)
    return (b * wy - torch.exp(w * b.unsqueeze(2)).sum(2).log()).mean(1)


class _Derivatives:
    """First and second derivative in ``beta`` of the mean NLL ``logsumexp(beta w) - beta w_y``:
    ``E_p[w] - w_y`` and ``Var_p[w]`` averaged over samples, ``p = softmax(beta w)``.

    Float32 (the fit only needs the root to ~1e-5; scores are float64): the moments
    ``sum_k e^{beta w} (1, w, w^2)`` are a sum and two batched dot products. Centring at the row
    maximum keeps ``E[w^2] - E[w]^2`` accurate for confident samples.
    """

    def __init__(self, w: Tensor, wy: Tensor):
        self.w = w.float()
        self.w2 = self.w * self.w
        self.wy = wy.float()

    def __call__(self, rows: Tensor, beta: Tensor) -> Tuple[Tensor, Tensor]:
        full = rows.numel() == self.w.shape[0]
        w, w2, wy = (self.w, self.w2, self.wy) if full else (self.w[rows], self.w2[rows], self.wy[rows])
        e = (w * beta.float().view(-1, 1, 1)).exp_()
        s0 = e.sum(2)
        mean = torch.einsum("bnk,bnk->bn", e, w) / s0
        var = (torch.einsum("bnk,bnk->bn", e, w2) / s0 - mean * mean).clamp_min(0)
        return (mean - wy).mean(1).to(beta.dtype), var.mean(1).to(beta.dtype)


def _fit_beta(w: Tensor, wy: Tensor, bounds: Tuple[float, float], start: Optional[Tensor] = None,
              tol: float = 1e-5, max_iter: int = 100) -> Tensor:
    """``beta = 1 / T`` in ``[1 / high, 1 / low]`` minimising the mean NLL of ``softmax(beta w)``
    for every row of ``w`` ``(B, N, K)`` (see :func:`_centred`).

    The NLL is convex in ``beta`` (a log-sum-exp of functions linear in ``beta`` minus a linear
    term), so its derivative is monotone and the minimum is its single root, or the bracket end
    it lies beyond. Safeguarded Newton: each evaluation shrinks the bracket around the root;
    a Newton step that leaves the bracket is replaced by the bracket's geometric midpoint (or
    by the bracket end itself when that was never evaluated, so a boundary optimum is reached
    in one step; so does a step that did not halve the previous one in the same direction), which
    bounds the iterations by bisection's. Stops when a step, the bracket or the step that
    quadratic convergence predicts next is below ``tol`` relative: about what float32
    derivatives resolve, and enough, since the score is flat at the optimum (its error is second
    order, ~1e-10).
    """
    rows = w.shape[0]
    derivatives = _Derivatives(w, wy)
    lo = torch.full((rows,), 1.0 / bounds[1], dtype=torch.float64, device=w.device)
    hi = torch.full((rows,), 1.0 / bounds[0], dtype=torch.float64, device=w.device)
    lo_seen = torch.zeros(rows, dtype=torch.bool, device=w.device)
    hi_seen = torch.zeros_like(lo_seen)
    beta = torch.ones_like(lo) if start is None else start.to(lo).clone()
    beta = torch.minimum(torch.maximum(beta, lo), hi)
    done = torch.zeros_like(lo_seen)
    last = torch.zeros_like(lo)  # the previous step
    was_newton = torch.zeros_like(lo_seen)  # ... and whether it was a Newton step
    for _ in range(max_iter):
        active = (~done).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        b = beta[active]
        g, h = derivatives(active, b)
        # the root lies below b. g == h == 0: every softmax is one-hot at its label (float32 cannot
        # tell the NLL from 0 any more): sharper is no worse, so the root is taken to lie above
        right = g > 0
        lo_a = torch.where(right, lo[active], b)
        hi_a = torch.where(right, b, hi[active])
        lo_seen_a = lo_seen[active] | ~right
        hi_seen_a = hi_seen[active] | right
        newton = b - g / h
        inside = torch.isfinite(newton) & (newton > lo_a) & (newton < hi_a)
        to_lo = ~inside & (newton <= lo_a) & ~lo_seen_a  # overshoot past an end never evaluated: try it
        to_hi = ~inside & (newton >= hi_a) & ~hi_seen_a
        mid = torch.sqrt(lo_a * hi_a)
        proposal = torch.where(inside, newton, torch.where(to_lo, lo_a, torch.where(to_hi, hi_a, mid)))
        # Newton crawls when the root lies beyond the bracket and the derivative decays
        # exponentially (a perfectly separated set: steps of constant size forever): a step
        # that did not halve the previous one in the same direction tries the unseen end
        prev, prev_newton = last[active], was_newton[active]
        step = proposal - b
        crawl = (step * prev > 0) & (step.abs() >= 0.5 * prev.abs())
        proposal = torch.where(crawl & (step > 0) & ~hi_seen_a, hi_a,
                               torch.where(crawl & (step < 0) & ~lo_seen_a, lo_a, proposal))
        step = proposal - b
        is_newton = inside & (proposal == newton)
        # two Newton steps in a row converging quadratically predict the next, |s|^3 / |s_prev|^2:
        # when that is below tol the step just proposed is final (saves a confirming evaluation)
        quadratic = is_newton & prev_newton & (step.abs() < 0.5 * prev.abs()) \
            & (step.abs() ** 3 <= tol * b * prev * prev)
        last[active], was_newton[active] = step, is_newton
        settled = ((g == 0) & (h > 0)) | (hi_a - lo_a <= tol * b)  # at the root, or the bracket closed on b
        beta[active] = torch.where(settled, b, proposal)
        lo[active], hi[active] = lo_a, hi_a
        lo_seen[active], hi_seen[active] = lo_seen_a, hi_seen_a
        done[active] = settled | (step.abs() <= tol * b) | quadratic
    return beta


def fit_temperature(log_probs: Tensor, labels: Tensor, bounds: Tuple[float, float] = TEMPERATURE_BOUNDS
                    ) -> Tuple[Tensor, Tensor]:
    """``(T, log_likelihood)``: for each ensemble ``log_probs[b]`` ``(samples, classes)`` of a
    ``(B, samples, classes)`` tensor (or one ``(samples, classes)``), the temperature ``T`` in
    ``bounds`` that maximises the mean validation log-likelihood of ``log_softmax(log_probs / T)``,
    and that maximum.

    What is scaled is the ensemble's log-probabilities, as GPS does (``apply_t`` on its
    log-mean-softmax): ``T > 1`` softens, ``T < 1`` sharpens. GPS fits ``T`` by Nelder-Mead from 1;
    here the NLL is minimised exactly over ``beta = 1/T`` (convex, see :func:`_fit_beta`).
    """
    single = isinstance(log_probs, Tensor) and log_probs.dim() == 2
    lp, y = _check_inputs(log_probs.unsqueeze(0) if single else log_probs, labels)
    _, bounds = _check_temperature("fit", bounds)
    w, wy = _centred(lp, y)
    beta = _fit_beta(w, wy, bounds)
    ll = _scaled_log_likelihood(w, wy, beta)
    t = 1.0 / beta
    return (t[0], ll[0]) if single else (t, ll)


# ----------------------------------------------------------------------------- GPS
def greedy_policy_search(log_probs: Tensor, labels: Tensor, n: int, temperature: Union[str, float, None] = "fit",
                         temperature_bounds: Tuple[float, float] = TEMPERATURE_BOUNDS,
                         chunk_elements: int = CHUNK_ELEMENTS) -> SearchResult:
    """Greedy Policy Search: ``n`` candidates (with replacement), each step adding the one that
    maximises the validation log-likelihood of the ensemble.

    The ``m``-member ensemble's log-probabilities are the log-mean-softmax
    ``logsumexp_i(log_probs[c_i]) - log m`` (a candidate chosen twice counts twice). With
    ``temperature="fit"`` (GPS's setting) every candidate ensemble is scored after scaling those
    log-probabilities by its own best temperature, ``log_softmax(ensemble / T)`` with ``T`` fitted
    on the same validation samples (:func:`fit_temperature`); ``None`` scores them unscaled and a
    number scales by that fixed ``T``. ``T`` only scores: the ensemble carried to the next step
    is the unscaled mean. All candidates of a step are evaluated in one batched pass (in chunks
    of about ``chunk_elements`` values). Ties within :data:`TIE_TOLERANCE` go to the lowest index.

    Returns ``SearchResult(indices, scores, temperatures)``: ``scores[i]`` the mean log-likelihood
    per sample of the first ``i + 1`` members at ``temperatures[i]``.
    """
    lp, y = _check_inputs(log_probs, labels)
    n = check_positive_int(n, "n")
    temperature, bounds = _check_temperature(temperature, temperature_bounds)
    chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
    c, samples, classes = lp.shape
    running: Optional[Tensor] = None  # logsumexp over the chosen members, (samples, classes)
    indices: List[int] = []
    scores: List[float] = []
    temps: List[float] = []
    prev_beta: Optional[Tensor] = None
    for step in range(n):
        m = step + 1
        step_scores = torch.empty(c, dtype=lp.dtype, device=lp.device)
        step_betas = torch.ones(c, dtype=lp.dtype, device=lp.device)
        for part in _chunks(c, samples * classes, chunk_elements):
            z = lp[part] if running is None else torch.logaddexp(running.unsqueeze(0), lp[part]) - math.log(m)
            w, wy = _centred(z, y)
            if temperature == "fit":
                start = None if prev_beta is None else prev_beta.expand(z.shape[0])
                beta = _fit_beta(w, wy, bounds, start=start)
            else:
                beta = torch.full((z.shape[0],), 1.0 if temperature is None else 1.0 / temperature,
                                  dtype=lp.dtype, device=lp.device)
            step_betas[part] = beta
            step_scores[part] = _scaled_log_likelihood(w, wy, beta)
        best = _argbest(step_scores)
        indices.append(best)
        scores.append(float(step_scores[best]))
        temps.append(float(1.0 / step_betas[best]))
        prev_beta = step_betas[best].view(1)
        running = lp[best].clone() if running is None else torch.logaddexp(running, lp[best])
    details = {"temperature": temperature,
               "temperature_bounds": list(bounds) if temperature == "fit" else None}
    return SearchResult(indices, scores, temps, "log_likelihood", "greedy", details)


# ----------------------------------------------------------------------------- budget
def _budget_scores(prob_sums: Tensor, y: Tensor, size: int) -> Tuple[Tensor, Tensor]:
    """``(correct counts (B,), mean NLL (B,))`` of the mean probability ``prob_sums / size``
    ``(B, samples, classes)``. A sample whose classes tie is decided by the lowest class index."""
    correct = (prob_sums.argmax(2) == y.view(1, -1)).sum(1)
    true = prob_sums.gather(2, y.view(1, -1, 1).expand(prob_sums.shape[0], -1, 1)).squeeze(2)
    nll = -(true / size).log().mean(1)
    return correct, nll


def _better(a: Tuple[float, float], b: Tuple[float, float], objective: str) -> bool:
    """Is key ``a`` (correct count, nll) strictly better than ``b`` (beyond ties)?"""
    def tol(x):
        return TIE_TOLERANCE * max(1.0, abs(x))

    if objective == "accuracy":
        if a[0] != b[0]:
            return a[0] > b[0]
        return a[1] < b[1] - tol(b[1])
    return a[1] < b[1] - tol(b[1])


def _best_in_batch(correct: Tensor, nll: Tensor, objective: str) -> int:
    """Index of the best row (accuracy, then NLL; or NLL alone), lowest among ties."""
    if objective == "accuracy":
        top = correct == correct.max()
        nll = torch.where(top, nll, torch.full_like(nll, math.inf))
    return _argbest(-nll)


def _greedy_budget(probs: Tensor, y: Tensor, start: int, pool: Sequence[int], steps: int, objective: str,
                   chunk_elements: int) -> Tuple[List[int], List[Tuple[int, float]]]:
    """From ``[start]``, ``steps`` times add the unused candidate of ``pool`` whose mean
    probability with the chosen ones scores best; ``(indices, [(correct, nll) per prefix])``."""
    samples, classes = probs.shape[1:]
    chosen = [start]
    total = probs[start].clone()
    keys = [tuple(v.item() for v in _budget_scores(total.unsqueeze(0), y, 1))]
    for step in range(steps):
        rest = [i for i in pool if i not in chosen]
        best_key, best_i = None, None
        for part in _chunks(len(rest), samples * classes, chunk_elements):
            idx = torch.tensor(rest[part], device=probs.device)
            correct, nll = _budget_scores(total.unsqueeze(0) + probs[idx], y, step + 2)
            j = _best_in_batch(correct, nll, objective)
            key = (int(correct[j]), float(nll[j]))
            if best_key is None or _better(key, best_key, objective):
                best_key, best_i = key, rest[part][j]
        chosen.append(best_i)
        total += probs[best_i]
        keys.append(best_key)
    return chosen, keys


def budget_policy_search(log_probs: Tensor, labels: Tensor, budget: int, identity: int = 0,
                         objective: str = "accuracy", exhaustive_limit: int = 20_000,
                         chunk_elements: int = CHUNK_ELEMENTS) -> SearchResult:
    """The best fixed policy of ``budget`` distinct candidates that contains ``identity``.

    Each subset is scored by the mean of its members' probabilities (no temperature):
    ``objective="accuracy"`` (ties broken by lower NLL) or ``"nll"``; remaining ties go to the
    lexicographically first subset. When the ``C(candidates - 1, budget - 1)`` subsets number at
    most ``exhaustive_limit`` every one is evaluated (in batches of about ``chunk_elements``
    values; ``method="exhaustive"``); otherwise greedy forward selection without repetition
    from ``[identity]`` (``method="greedy"``), each step adding the candidate that scores best
    with those chosen, ties to the lowest index.

    Returns ``indices`` with ``identity`` first and the others in the order a greedy pass
    within the subset adds them (each prefix as good as the subset allows, for users who
    truncate); ``scores[i]`` is the objective of the first ``i + 1`` (accuracy as a fraction, or
    mean NLL); ``temperatures`` are all 1.0 (unscaled).
    """
    lp, y = _check_inputs(log_probs, labels)
    c, samples, classes = lp.shape
    budget = check_positive_int(budget, "budget")
    if budget > c:
        raise ValueError(f"budget must be at most the number of candidates ({c}), got {budget}")
    if isinstance(identity, bool) or not isinstance(identity, int) or not 0 <= identity < c:
        raise ValueError(f"identity must be a candidate index in 0..{c - 1}, got {identity!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if isinstance(exhaustive_limit, bool) or not isinstance(exhaustive_limit, int) or exhaustive_limit < 0:
        raise ValueError(f"exhaustive_limit must be a non-negative integer, got {exhaustive_limit!r}")
    chunk_elements = check_positive_int(chunk_elements, "chunk_elements")
    probs = lp.exp()
    others = [i for i in range(c) if i != identity]
    subsets = math.comb(c - 1, budget - 1)
    if subsets <= exhaustive_limit:
        method = "exhaustive"
        best_key, best_members = None, None
        combos = itertools.combinations(others, budget - 1)  # lexicographic order: the first of ties wins
        per_batch = max(1, chunk_elements // (samples * classes * max(1, budget - 1)))
        while True:
            batch = list(itertools.islice(combos, per_batch))
            if not batch:
                break
            total = probs[identity].unsqueeze(0)
            if budget > 1:
                idx = torch.tensor(batch, device=lp.device)
                total = total + probs[idx].sum(1)
            correct, nll = _budget_scores(total, y, budget)
            j = _best_in_batch(correct, nll, objective)
            key = (int(correct[j]), float(nll[j]))
            if best_key is None or _better(key, best_key, objective):
                best_key, best_members = key, list(batch[j])
        chosen, keys = _greedy_budget(probs, y, identity, best_members, budget - 1, objective, chunk_elements)
    else:
        method = "greedy"
        chosen, keys = _greedy_budget(probs, y, identity, others, budget - 1, objective, chunk_elements)
    scores = [k[0] / samples if objective == "accuracy" else k[1] for k in keys]
    return SearchResult(chosen, scores, [1.0] * len(chosen), objective, method,
                        {"subsets": subsets, "exhaustive_limit": exhaustive_limit, "identity": identity})


# ----------------------------------------------------------------------------- policy files
#: Version of the policy file written by :func:`policy_document`.
POLICY_FORMAT = 1


def policy_document(result: SearchResult, search: str, manifest: Dict[str, Any], settings: Dict[str, Any],
                    predictions: Optional[Dict[str, Any]] = None,
                    extra_candidates: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The JSON a search writes: what was chosen (ordered candidates with their op specs; GPS
    may list one twice, which counts twice in the mean), how (``search``, ``method``,
    ``objective``, ``settings``), each step's validation score and temperature, and what it was
    searched on: the pool (name, parameters, fingerprint, candidate names) and the model and data
    as a prediction cache's ``manifest`` records them (``predictions``: the cache's directory and
    identity).

    ``extra_candidates``: specs of candidates searched beyond the cache's pool (the staged
    search's composites), indexed after it. The pool recorded is then the one searched: the
    cache's candidates and these (named ``"<pool>+composites"``, its fingerprint that of their
    specs, ``params.base`` the cache's pool), and ``result.details`` is kept as ``details``."""
    extra = list(extra_candidates or [])
    names = list(manifest["candidate_names"]) + [s["name"] for s in extra]
    specs = list(manifest["candidate_specs"]) + extra
    pool = {"name": manifest["space"], "params": manifest.get("space_params", {}),
            "fingerprint": manifest["space_fingerprint"], "candidate_names": names}
    if extra:
        from .registry import space_from_specs

        pool = {"name": f"{manifest['space']}+composites",
                "params": {"base": {k: v for k, v in pool.items() if k != "candidate_names"}},
                "fingerprint": space_from_specs(specs).fingerprint, "candidate_names": names}
    doc = {
        "kind": "ttach-instance policy",
        "format": POLICY_FORMAT,
        "search": search,
        "method": result.method,
        "objective": result.objective,
        "settings": settings,
        "candidates": [specs[i] for i in result.indices],
        "indices": list(result.indices),
        "steps": [{"index": i, "candidate": names[i], "score": s, "temperature": t}
                  for i, s, t in zip(result.indices, result.scores, result.temperatures)],
        "pool": pool,
        "model": manifest["model"],
        "data": {"dataset": manifest["dataset"], "num_images": manifest["num_images"], "size": manifest["size"],
                 "source_size": manifest["source_size"]},
        "predictions": predictions,
    }
    if extra_candidates is not None:
        doc["details"] = result.details
    return doc
