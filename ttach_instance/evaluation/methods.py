"""The Table-1 methods, each defined once as a wrapper factory, and the oracle baselines.

A method is a function ``(model, space, predictor, mean, std, output_key) -> wrapper``; the
harness calls the wrapper exactly as a user would. Oracle-k needs the labels, so its wrappers
live here with the evaluation, not among the deployable ones.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ..fusion import FusionWeights, load_fusion
from ..io import tensors_sha256
from ..policy import Policy, load_policy, policy_space, read_policy
from ..registry import get_space
from ..segmentation import LOSS_KINDS, segmentation_loss
from ..selection import check_k, select_oracle
from ..space import Candidate, TransformSpace
from ..wrappers import (FullSpaceWrapper, LossGuidedSegmentationWrapper, LossGuidedWrapper, RandomKSegmentationWrapper,
                        RandomKWrapper, Selection, SegmentationTTAWrapper, TTAWrapper, _FullSpace, resolve_space)

__all__ = ["METHODS", "LABELS", "MODEL_CALLS", "PREDICTOR_METHODS", "SEG_METHODS", "SEG_LABELS", "build_method",
           "OracleKWrapper", "OracleKSegmentationWrapper", "ViewMemo", "identity_space", "GPS_PREFIXES",
           "load_policies", "policy_methods"]


def identity_space() -> TransformSpace:
    """The one-candidate space of the plain model (the Identity row)."""
    return TransformSpace([Candidate()], name="identity")


class _OracleK(_FullSpace):
    """Every candidate runs; the ``k`` views with the lowest *true* loss are merged (the paper's
    upper bound: it needs the labels, ``wrapper(x, target)``). ``merge_mode="weighted"`` weighs the
    chosen views by their true losses."""

    has_losses = True

    def view_loss(self, per_view: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def run(self, x: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        x = self._check_input(x)
        if not isinstance(target, Tensor) or target.shape[:1] != x.shape[:1]:
            raise ValueError(f"target must be a tensor with one entry per input ({x.shape[0]}), got "
                             f"{tuple(getattr(target, 'shape', ())) or type(target).__name__}")
        pixels = self._pixels(x)
        every, _, _ = _FullSpace.select(self, x, pixels)
        per_view, validity = self.view_outputs(x, pixels, every, args, kwargs)
        with torch.no_grad():
            true = self.view_loss(per_view.detach(), target).float()
        index = select_oracle(true, self.k)
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        chosen = per_view[rows, index]
        valid = None if validity is None else validity[rows, index]
        merged, coverage = self.merge(chosen, valid, true.gather(1, index), x, args, kwargs)
        return {"output": merged, "selection": Selection(index=index, true_losses=true), "views": chosen,
                "validity": valid, "coverage": coverage}

    def forward(self, x: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> Any:
        r = self.run(x, target, *args, **kwargs)
        return self._wrap(r["output"], r["selection"])


class OracleKWrapper(_OracleK):
    """Classification oracle: ``loss_fn(outputs (N, C), targets (N,)) -> (N,)`` per-view losses
    (default cross entropy)."""

    def __init__(self, model: Callable[..., Any], space: Any, k: int = 1,
                 loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, merge_mode: str = "mean",
                 merge_space: str = "probs", mean: Any = None, std: Any = None, chunk_size: Optional[int] = None,
                 temperature: float = 1.0, output_label_key: Optional[str] = None, return_selection: bool = False):
        TTAWrapper.__init__(self, model, space, len(resolve_space(space)), merge_mode, merge_space, mean, std, chunk_size,
                            temperature, output_label_key, return_selection=return_selection)
        self.k = check_k(k, len(self.space), self.space.name)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> per-sample losses, got {loss_fn!r}")
        self.loss_fn = loss_fn or (lambda out, y: TF.cross_entropy(out.float(), y, reduction="none"))

    def view_loss(self, per_view: Tensor, target: Tensor) -> Tensor:
        b, t = per_view.shape[:2]
        losses = self.loss_fn(per_view.flatten(0, 1), target.repeat_interleave(t, 0))
        if not isinstance(losses, Tensor) or losses.shape != (b * t,):
            raise ValueError(f"loss_fn must return per-sample losses of shape ({b * t},) (reduction='none'), got "
                             f"{tuple(getattr(losses, 'shape', ())) or type(losses).__name__}")
        return losses.view(b, t)


class OracleKSegmentationWrapper(_OracleK):
    """Segmentation oracle: the true per-image ``loss`` (``"ce"`` or ``"dice"``) of every
    candidate's de-augmented output against the label maps ``target`` ``(B, H, W)``."""

    def __init__(self, model: Callable[..., Any], space: Any, k: int = 1, loss: str = "ce", ignore_index: int = 255,
                 merge_mode: str = "mean", merge_space: str = "probs", mean: Any = None, std: Any = None,
                 chunk_size: Optional[int] = None, output_mask_key: Optional[str] = None,
                 interpolation: str = "bilinear", coverage: str = "extrapolate", return_selection: bool = False):
        TTAWrapper.__init__(self, model, space, len(resolve_space(space)), merge_mode, merge_space, mean, std, chunk_size,
                            1.0, output_mask_key, dense=True, interpolation=interpolation, coverage=coverage,
                            return_selection=return_selection)
        self.k = check_k(k, len(self.space), self.space.name)
        if loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {list(LOSS_KINDS)}, got {loss!r}")
        self.loss, self.ignore_index = loss, ignore_index

    def view_loss(self, per_view: Tensor, target: Tensor) -> Tensor:
        b, t = per_view.shape[:2]
        flat = per_view.flatten(0, 1)
        return segmentation_loss(flat, target.to(flat.device).repeat_interleave(t, 0), kind=self.loss,
                                 ignore_index=self.ignore_index).view(b, t)


class ViewMemo(nn.Module):
    """``model`` run once per distinct input row between two :meth:`clear` calls.

    The harness runs every method's wrapper on the same batch; their views overlap (the identity
    view, the full space, the chosen candidates), so each distinct view is computed once and
    replayed bit for bit. Rows are keyed by a 128-bit BLAKE2 digest of their bytes. The
    model must treat rows independently (eval mode); ``mean``/``std`` are read through to it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model
        self._cache: Dict[bytes, Tensor] = {}

    def clear(self) -> None:
        self._cache.clear()

    @staticmethod
    def _key(row: Tensor) -> bytes:
        h = hashlib.blake2b(f"{row.dtype}|{tuple(row.shape)}".encode(), digest_size=16)
        h.update(row.detach().contiguous().cpu().numpy().tobytes())
        return h.digest()

    def forward(self, x: Tensor) -> Tensor:
        keys = [self._key(row) for row in x]
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            rows = torch.tensor([first[k] for k in missing], device=x.device)
            out = self.module(x.index_select(0, rows))
            for k, o in zip(missing, out):
                self._cache[k] = o
        return torch.stack([self._cache[k] for k in keys])


# -- the methods -----------------------------------------------------------------------------------

Factory = Callable[..., nn.Module]


def _classification() -> Dict[str, Tuple[str, int, Factory]]:
    def full(space_name: Optional[str] = None, merge_space: str = "probs"):
        def factory(model, space, predictor, **kw):
            return FullSpaceWrapper(model, identity_space() if space_name == "identity" else
                                    get_space(space_name) if space_name else space, merge_space=merge_space, **kw)
        factory.space_name = space_name  # FIXED_SPACES
        return factory

    def random(k: int):
        return lambda model, space, predictor, **kw: RandomKWrapper(model, space, k=k, seed=0, **kw)

    def ours(k: int, flip: bool):
        return lambda model, space, predictor, **kw: LossGuidedWrapper(model, predictor, k=k, flip=flip, space=space,
                                                                       return_selection=True, **kw)

    def oracle(k: int):
        return lambda model, space, predictor, **kw: OracleKWrapper(model, space, k=k, return_selection=True, **kw)

    def ours_in_crops(k: int, crops: str):
        # Table 4's "Ours + 5-Crops": Ours inside every crop. Per-crop selection: each crop is a
        # model-size input, so the predictor scores what the model will see (per-image selection
        # would apply candidates it scored on the uncropped image); the wrappers nest as they are.
        def factory(model, space, predictor, **kw):
            inner = LossGuidedWrapper(model, predictor, k=k, space=space, **kw)
            return FullSpaceWrapper(inner, get_space(crops), return_selection=True, **kw)
        return factory

    return {
        "identity": ("Identity", 1, full("identity")), "hflip": ("H-Flip", 2, full("hflip")),
        "five_crops": ("5-Crops", 5, full("five_crops")), "ten_crops": ("10-Crops", 10, full("ten_crops")),
        "center_crop_paper": ("Center-Crop", 1, full("center_crop_paper")),
        "five_crops_paper": ("5-Crops (paper)", 5, full("five_crops_paper")),
        "ten_crops_paper": ("10-Crops (paper)", 10, full("ten_crops_paper")),
        "random_k1": ("Random k=1", 1, random(1)), "random_k2": ("Random k=2", 2, random(2)),
        "random_k4": ("Random k=4", 4, random(4)), "full_mean": ("Full-space mean", 0, full()),
        "ours_k1": ("Ours k=1", 1, ours(1, False)), "ours_k2": ("Ours k=2", 2, ours(2, False)),
        "ours_k1_hflip": ("Ours k=1 + H-Flip", 2, ours(1, True)),
        "ours_k2_hflip": ("Ours k=2 + H-Flip", 4, ours(2, True)),
        "ours_k2_five_crops": ("Ours k=2 + 5-Crops", 10, ours_in_crops(2, "five_crops_paper")),
        "oracle_k1": ("Oracle k=1", 0, oracle(1)),
        # the fixed spaces with the views' logits averaged (ttach's merge) instead of probabilities
        "hflip_logits": ("H-Flip (logits)", 2, full("hflip", "logits")),
        "five_crops_logits": ("5-Crops (logits)", 5, full("five_crops", "logits")),
        "ten_crops_logits": ("10-Crops (logits)", 10, full("ten_crops", "logits")),
        "five_crops_paper_logits": ("5-Crops (paper, logits)", 5, full("five_crops_paper", "logits")),
        "ten_crops_paper_logits": ("10-Crops (paper, logits)", 10, full("ten_crops_paper", "logits")),
        "full_mean_logits": ("Full-space mean (logits)", 0, full(None, "logits")),
    }


def _segmentation() -> Dict[str, Tuple[str, int, Factory]]:
    def full(space_name: Optional[str] = None):
        return lambda model, space, predictor, **kw: SegmentationTTAWrapper(
            model, identity_space() if space_name == "identity" else space_name or space, **_seg(kw))

    def d4_ttach(model, space, predictor, **kw):
        import ttach as tta

        return tta.SegmentationTTAWrapper(model, tta.aliases.d4_transform(), merge_mode="mean",
                                          output_mask_key=kw.get("output_key"))

    return {
        "identity": ("Identity", 1, full("identity")), "hflip": ("H-Flip", 2, full("hflip")),
        "d4_ttach": ("D4 (ttach)", 8, d4_ttach), "full_mean": ("Full-space mean", 0, full()),
        "random_k1": ("Random k=1", 1, lambda m, s, p, **kw: RandomKSegmentationWrapper(m, s, k=1, **_seg(kw))),
        "random_k2": ("Random k=2", 2, lambda m, s, p, **kw: RandomKSegmentationWrapper(m, s, k=2, **_seg(kw))),
        "ours_k1": ("Ours k=1", 1, lambda m, s, p, **kw: LossGuidedSegmentationWrapper(
            m, p, space=s, k=1, return_selection=True, **_seg(kw))),
        "ours_k2": ("Ours k=2", 2, lambda m, s, p, **kw: LossGuidedSegmentationWrapper(
            m, p, space=s, k=2, return_selection=True, **_seg(kw))),
        "oracle_k1": ("Oracle k=1", 0, lambda m, s, p, loss="ce", ignore_index=255, **kw: OracleKSegmentationWrapper(
            m, s, k=1, loss=loss, ignore_index=ignore_index, return_selection=True, **_seg(kw))),
    }


def _seg(kw: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(kw)
    if "output_key" in out:
        out["output_mask_key"] = out.pop("output_key")
    out.pop("loss", None)
    out.pop("ignore_index", None)
    return out


_CLASSIFICATION = _classification()
_SEGMENTATION = _segmentation()
METHODS = tuple(_CLASSIFICATION)
LABELS = {m: v[0] for m, v in _CLASSIFICATION.items()}
#: Model forwards per image of each method (0: the space's size).
MODEL_CALLS = {m: v[1] for m, v in _CLASSIFICATION.items() if v[1]}
PREDICTOR_METHODS = tuple(m for m in METHODS if m.startswith("ours"))
#: The registered space each method averages whatever the evaluation's space (H-Flip, the crops...).
FIXED_SPACES = {m: v[2].space_name for m, v in _CLASSIFICATION.items() if getattr(v[2], "space_name", None)}
SEG_METHODS = tuple(_SEGMENTATION)
SEG_LABELS = {m: v[0] for m, v in _SEGMENTATION.items()}


def build_method(method: str, model: nn.Module, space: TransformSpace, predictor: Optional[nn.Module] = None,
                 task: str = "classification", policies: Optional[Mapping[str, Any]] = None,
                 **kwargs: Any) -> nn.Module:
    """The wrapper that defines ``method``: classification ``kwargs`` go to the wrapper (``mean``,
    ``std``, ``output_label_key``...); segmentation takes ``output_key``, ``loss``, ``ignore_index``.
    ``policies`` (``{name: policy file, document or Policy}``, classification) adds their rows
    (:func:`policy_methods`)."""
    table = _CLASSIFICATION if task == "classification" else _SEGMENTATION
    if policies:
        if task != "classification":
            raise ValueError(f"policies: policy rows are classification methods, got task {task!r}")
        table = {**table, **policy_methods(load_policies(policies))}
    if method not in table:
        raise ValueError(f"method must be one of {list(table)} for {task}, got {method!r}")
    if method in PREDICTOR_METHODS and predictor is None:
        raise ValueError(f"method {method!r} needs a loss predictor")
    return table[method][2](model, space, predictor, **kwargs)


# -- policy rows: GPS and budget policy files (``eval --policy NAME=FILE``) --------------------------
#: The GPS prefixes evaluated from one policy file, besides its full length N (Table 1's 1/2/4/N).
GPS_PREFIXES = (1, 2, 4)


def load_policies(policies: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``{name: Policy}`` from ``{name: policy file, document or Policy}`` (``eval --policy
    NAME=FILE``), each read and checked by :mod:`ttach_instance.policy`.

    ``name`` keys the rows (``[a-z0-9_]``, not a built-in method's name). A GPS policy gives the
    rows ``<name>_n1``, ``_n2``, ``_n4`` and ``_n<N>`` (its whole length; prefixes longer than it
    left out); any other search (budget, staged) gives one row ``<name>`` over all its
    candidates."""
    out: Dict[str, Any] = {}
    for name, source in dict(policies or {}).items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(f"policies: a policy's name must be lowercase letters, digits or '_', got {name!r}")
        if name in _CLASSIFICATION:
            raise ValueError(f"policies: {name!r} is a built-in method's name; name the policy otherwise")
        if isinstance(source, FusionWeights) or (isinstance(source, str) and source.endswith(".safetensors")):
            out[name] = source if isinstance(source, FusionWeights) else load_fusion(source)  # eval --fusion
            continue
        out[name] = source if isinstance(source, Policy) else \
            read_policy(dict(source), f"policy {name!r}") if isinstance(source, Mapping) else load_policy(source)
    return out


def row_fingerprint(policy: Any) -> str:
    """What a policy row's numbers depend on, for the run identity: its space's fingerprint (and,
    for learned fusion weights, a hash of the weights)."""
    if isinstance(policy, FusionWeights):
        return f"{policy.space_fingerprint}:{tensors_sha256({'weight': policy.weight})[:16]}"
    return policy_space(policy).fingerprint


def policy_methods(policies: Optional[Mapping[str, Policy]]) -> Dict[str, Tuple[str, int, Factory]]:
    """The rows of loaded policies (:func:`load_policies`): ``{key: (label, model calls, factory)}``.

    Each row is ``FullSpaceWrapper(model, policy_space(policy, n))``, the policy's first ``n``
    candidates (a GPS candidate chosen twice counts twice in the mean); its cost is ``n`` model
    calls. Labels: ``"GPS n=4"``, ``"Budget N=2"``, followed by the policy's name in parentheses
    unless it is the plain ``gps`` / ``budget<N>``. Learned fusion weights (a
    :class:`~ttach_instance.fusion.FusionWeights` or its ``.safetensors`` file, ``eval --fusion``)
    give one row ``FullSpaceWrapper(model, its space, fusion=...)``, "Learned fusion (<space>)"."""
    rows: Dict[str, Tuple[str, int, Factory]] = {}

    def row(policy: Policy, n: Optional[int]) -> Factory:
        def factory(model, space, predictor, **kw):
            return FullSpaceWrapper(model, policy_space(policy, n), **kw)
        return factory

    def fused(fusion: FusionWeights) -> Factory:
        def factory(model, space, predictor, **kw):
            return FullSpaceWrapper(model, fusion.space, fusion=fusion, **kw)
        return factory

    for name, policy in (policies or {}).items():
        if isinstance(policy, FusionWeights):  # learned fusion weights (eval --fusion): every candidate, fused
            label = f"Learned fusion ({policy.space.name})" + ("" if name.startswith("fusion") else f" ({name})")
            rows[name] = (label, len(policy.space), fused(policy))
            continue
        total = len(policy)
        if policy.search == "gps":
            suffix = "" if name == "gps" else f" ({name})"
            for n in dict.fromkeys([p for p in GPS_PREFIXES if p < total] + [total]):
                rows[f"{name}_n{n}"] = (f"GPS n={n}{suffix}", n, row(policy, n))
        else:
            kind = "Budget" if policy.search in ("budget", "staged") else policy.search.title()
            suffix = "" if name in ("budget", f"budget{total}") else f" ({name})"
            rows[name] = (f"{kind} N={total}{suffix}", total, row(policy, None))
    return rows
