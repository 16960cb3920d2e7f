"""Fitted merges: learned fusion weights for a fixed space, and the fitted temperature of the
loss-weighted merge.

**Learned fusion weights** (:class:`FusionWeights`; the "learnable TTA fusion weights" approach,
first used for segmentation). One weight ``w_t`` per candidate ``t`` of a space (or, with
``per_class=True``, one per candidate and class ``w_tc``), normalised by a softmax over the
candidates; the fused output is

    p(x) = sum_t softmax(w)_t * v_t * p_t(x) / sum_t softmax(w)_t * v_t

with ``p_t`` the (de-augmented) softmax probabilities of view ``t`` and ``v_t`` its validity map
(dense outputs; 1 for classification) -- exactly :func:`~ttach_instance.merge.merge_outputs`'s
``"weighted"`` merge over probabilities with the validity maps as per-element weights, the view
weights ``softmax(w)`` in place of ``softmax(-losses / T)``: pixels no view saw keep the view
weights alone, and a view's weight counts only where it saw the pixel. Per class, each class
column of ``softmax(w)`` sums to 1 but the fused vector need not, so it is renormalised over the
classes (a distribution again). Zero weights are the uniform mean, the wrappers' default merge.
The output, like the wrappers' ``merge_space="probs"``, is the *logarithm* of the fused
probabilities (logit-like: argmax and cross-entropy read it as they read logits).

:func:`fit_fusion` fits the weights with the model frozen, from per-view outputs computed once
(:func:`collect_views`; the fit is tensor work, not a model call per epoch). The recipe is the
original's: Adam, learning rate 0.01, 5 epochs, about 100 validation images, views = original,
h-flip, v-flip, both flips (the ``flips`` space). **Objective:** the original feeds the fused
*probabilities* to a cross-entropy as if they were logits, i.e. minimises
``-log softmax(p)_y``; since every ``p_c`` lies in [0, 1] that softmax is nearly uniform (its
log-odds never exceed 1) and the loss barely tells a harmful view from a good one. Here the
negative log-likelihood of the fused probabilities, ``-log p_y``, is minimised: the proper
scoring rule for a mixture of the views' distributions, whose optimum down-weights a view that
puts probability on wrong classes.

Weights are saved as one safetensors file (the weights, and JSON metadata with a format version,
the space's name, parameters, fingerprint and candidate names, the number of classes and the
fit's record) and loaded by :func:`load_fusion`, which refuses a file of another kind or version,
of another space (fingerprint), or whose tensor does not have the recorded shape, naming the file
and what was expected and found. The wrappers that run every candidate of a space
(``FullSpaceWrapper``, ``SegmentationTTAWrapper``) take ``fusion=`` (a :class:`FusionWeights` or
a file) in place of their uniform merge.

**Fitted temperature** (:func:`fit_weighted_temperature`). ``merge_mode="weighted"`` weighs the
``k`` chosen views by ``softmax(-predicted losses / T)``; ``T`` is fitted on validation data by
minimising the NLL of the weighted merge (the wrapper's output read as logits: for
``merge_space="probs"`` the NLL of the weighted mixture of the views' probabilities) over a
log-spaced grid refined by golden-section search. :func:`store_temperature` records it with a
loss predictor (saved in its checkpoint metadata, keyed by ``k``, ``flip`` and ``merge_space``),
and the loss-guided wrappers use it when they are given no ``temperature``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .merge import MERGE_SPACES, check_merge_space, check_temperature, merge_outputs
from .selection import check_positive_int
from .space import TransformSpace

__all__ = ["FORMAT_VERSION", "KIND", "RECIPE", "FusionWeights", "fit_fusion", "load_fusion", "fusion_nll",
           "collect_views", "weighted_merge_nll", "fit_weighted_temperature", "fitted_temperature",
           "store_temperature", "TEMPERATURE_KEYS"]

#: Version of the fusion weights file; files of any other version are refused.
FORMAT_VERSION = 1
KIND = "ttach_instance.fusion_weights"
#: The original recipe: Adam, learning rate, epochs (about 100 validation images, the flips space).
RECIPE = {"optimizer": "adam", "lr": 0.01, "epochs": 5, "batch_size": 1}
#: The keys of one fitted temperature recorded with a predictor (``predictor.merge_temperatures``).
TEMPERATURE_KEYS = ("k", "flip", "merge_space", "temperature", "objective", "images", "nll", "nll_at_1")


def _space(space: Any, name: str = "space") -> TransformSpace:
    if isinstance(space, TransformSpace):
        return space
    if isinstance(space, str):
        from .registry import get_space

        return get_space(space)
    raise TypeError(f"{name} must be a TransformSpace or a registered space name, got {type(space).__name__}")


def _fuse(probs: Tensor, weights: Tensor, validity: Optional[Tensor], per_class: bool) -> Tensor:
    """``sum_t a_t v_t p_t / sum_t a_t v_t`` over dim 1 of ``probs`` ``(B, T, C, ...)``;
    ``weights`` ``a`` ``(T,)`` or ``(T, C)`` (columns summing to 1); where no view has positive
    weight (uncovered) ``sum_t a_t p_t``; renormalised over the classes when ``per_class``."""
    t, extra = probs.shape[1], probs.dim() - 3
    shape = (1, t) + ((1,) if weights.dim() == 1 else (weights.shape[1],)) + (1,) * extra
    a = weights.to(probs.dtype).reshape(shape)
    zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
    plain = (a * probs).sum(1)
    if validity is None:
        fused = plain
    else:
        w = a * validity.to(probs.dtype)
        used = w > 0  # zero-weight entries ignored entirely, as merge_outputs does
        den = torch.where(used, w, zero).sum(1)
        covered = den > 0
        num = torch.where(used, w * probs, zero).sum(1)
        fused = torch.where(covered, num / torch.where(covered, den, torch.ones_like(den)), plain)
    if per_class:
        fused = fused / fused.sum(1, keepdim=True).clamp_min(torch.finfo(fused.dtype).tiny)
    return fused


def _package_version() -> Optional[str]:
    """The installed ttach-instance's version (read from its distribution: importing the package
    root from here would close an import loop through the wrappers)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ttach-instance")
    except PackageNotFoundError:
        return None


def _log(p: Tensor) -> Tensor:
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


class FusionWeights(nn.Module):
    """Learned fusion of every candidate of ``space`` (see the module docstring).

    Args:
        space: the space whose candidates' views are fused (a :class:`TransformSpace` or a name).
        num_classes: classes of the model's outputs (required with ``per_class``; recorded and
            checked against the outputs when given).
        per_class: one weight per candidate and class instead of one per candidate.

    ``weight`` ``(T,)`` or ``(T, C)`` starts at zero (the uniform mean). ``forward(outputs,
    validity=None)`` takes the views' raw outputs ``(B, T, C, ...)`` (logits or log-probabilities:
    the softmax is taken over dim 2), in the space's candidate order, and validity maps
    broadcastable to them (``(B, T, 1, h, w)``), and returns the log of the fused probabilities
    ``(B, C, ...)``.
    """

    def __init__(self, space: Any, num_classes: Optional[int] = None, per_class: bool = False):
        super().__init__()
        self.space = _space(space)
        if not isinstance(per_class, bool):
            raise TypeError(f"per_class must be True or False, got {per_class!r}")
        if num_classes is not None:
            num_classes = check_positive_int(num_classes, "num_classes")
        if per_class and num_classes is None:
            raise ValueError("per_class=True needs num_classes (one weight per candidate and class)")
        self.per_class, self.num_classes = per_class, num_classes
        t = len(self.space)
        self.weight = nn.Parameter(torch.zeros((t, num_classes) if per_class else (t,)))
        #: What :func:`fit_fusion` recorded (recipe, images, NLL and accuracy before and after).
        self.fit_info: Dict[str, Any] = {}

    @property
    def space_fingerprint(self) -> str:
        return self.space.fingerprint

    def view_weights(self) -> Tensor:
        """``softmax(weight)`` over the candidates: ``(T,)`` or ``(T, C)``, each column summing to 1."""
        return torch.softmax(self.weight.float(), 0)

    def _check(self, outputs: Any, validity: Any) -> None:
        t = len(self.space)
        if not isinstance(outputs, Tensor) or outputs.dim() < 3 or not outputs.is_floating_point():
            raise ValueError(f"fusion takes the views' float outputs (B, {t}, classes, ...), got "
                             f"{getattr(outputs, 'dtype', type(outputs).__name__)} {tuple(getattr(outputs, 'shape', ()))}")
        if outputs.shape[1] != t:
            raise ValueError(f"fusion weights for space {self.space.name!r} fuse its {t} candidates' views, got "
                             f"{outputs.shape[1]} views per input (outputs {tuple(outputs.shape)})")
        if self.num_classes is not None and outputs.shape[2] != self.num_classes:
            raise ValueError(f"fusion weights were fitted for {self.num_classes} classes, the outputs have "
                             f"{outputs.shape[2]} (outputs {tuple(outputs.shape)})")
        if validity is not None:
            if not isinstance(validity, Tensor) or validity.dim() != outputs.dim():
                raise ValueError(f"validity must be a tensor of the outputs' rank broadcastable to {tuple(outputs.shape)}"
                                 f" (e.g. (B, {t}, 1, h, w)), got {tuple(getattr(validity, 'shape', ()))}")
            try:
                ok = torch.broadcast_shapes(validity.shape, outputs.shape) == outputs.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"validity {tuple(validity.shape)} does not broadcast to outputs {tuple(outputs.shape)}")

    def fuse(self, outputs: Tensor, validity: Optional[Tensor] = None) -> Tensor:
        """The fused probabilities ``(B, C, ...)`` (float32 or float64, as the outputs)."""
        self._check(outputs, validity)
        dtype = torch.float64 if outputs.dtype == torch.float64 else torch.float32
        return _fuse(outputs.to(dtype).softmax(2), self.view_weights(), validity, self.per_class)

    def forward(self, outputs: Tensor, validity: Optional[Tensor] = None) -> Tensor:
        return _log(self.fuse(outputs, validity)).to(outputs.dtype)

    def extra_repr(self) -> str:
        return (f"space={self.space.name!r} ({len(self.space)} candidates), per_class={self.per_class}, "
                f"num_classes={self.num_classes}")

    # -- files -------------------------------------------------------------------------------
    def metadata(self) -> Dict[str, Any]:
        return {"kind": KIND, "format_version": FORMAT_VERSION, "space": self.space.name,
                "space_params": self.space.params, "space_fingerprint": self.space.fingerprint,
                "candidate_names": list(self.space.names), "per_class": self.per_class,
                "num_classes": self.num_classes, "fit": self.fit_info,
                "versions": {"ttach_instance": _package_version(), "torch": torch.__version__}}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the weights and metadata to one ``.safetensors`` file (atomically; no pickle)."""
        from .io import atomic_save_tensors

        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".safetensors"):
            raise ValueError(f"path must end in .safetensors, got {path!r}")
        atomic_save_tensors(os.fspath(path), {"weight": self.weight.detach().float()}, self.metadata())


def load_fusion(path: Union[str, os.PathLike], space: Any = None, num_classes: Optional[int] = None) -> FusionWeights:
    """Fusion weights from a :meth:`FusionWeights.save` file, checked before use.

    ``space``: the space they must fuse (default: rebuilt from the recorded name and parameters);
    ``num_classes``: the classes the outputs will have. A file of another kind or format version,
    another space (fingerprint), another number of classes, or whose tensor is not the recorded
    shape (or not finite) is a ``ValueError`` naming the file, what was expected and what was found.
    """
    from .io import load_tensors

    path = os.fspath(path)
    where = f"fusion weights {path!r}"
    if not path.endswith(".safetensors"):
        raise ValueError(f"{where}: a fusion weights file is a .safetensors file")
    tensors, meta = load_tensors(path)  # missing or unreadable: a ValueError naming the file
    if meta.get("kind") != KIND:
        raise ValueError(f"{path!r} is not a ttach-instance fusion weights file (kind {meta.get('kind')!r}, expected "
                         f"{KIND!r})")
    if type(meta.get("format_version")) is not int or meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{where} has format version {meta.get('format_version')!r}; this ttach-instance reads "
                         f"version {FORMAT_VERSION} only: fit the weights again (ttach-instance fuse weights)")
    names, fingerprint, per_class = meta.get("candidate_names"), meta.get("space_fingerprint"), meta.get("per_class")
    classes = meta.get("num_classes")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names) and isinstance(fingerprint, str)
            and isinstance(per_class, bool) and (classes is None or (type(classes) is int and classes >= 1))
            and not (per_class and classes is None) and isinstance(meta.get("fit", {}), dict)):
        raise ValueError(f"{where}: metadata must hold the space's candidate names and fingerprint, per_class (bool) "
                         f"and num_classes (null or a positive int; an int when per_class)")
    if space is None:
        from .registry import space_from_record

        space = space_from_record(meta, where)
    space = _space(space)
    if space.fingerprint != fingerprint:
        raise ValueError(f"{where} were fitted for space {meta.get('space')!r} ({len(names)} candidates "
                         f"{names}, fingerprint {fingerprint}); expected space {space.name!r} ({len(space)} candidates "
                         f"{space.names}, fingerprint {space.fingerprint})")
    if num_classes is not None and classes is not None and classes != num_classes:
        raise ValueError(f"{where} were fitted for {classes} classes; expected {num_classes}")
    expected = (len(space), classes) if per_class else (len(space),)
    weight = tensors.get("weight")
    if set(tensors) != {"weight"} or weight is None or tuple(weight.shape) != expected \
            or not weight.is_floating_point():
        found = {k: (str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in tensors.items()}
        raise ValueError(f"{where}: expected one float tensor 'weight' of shape {expected} (space {space.name!r}, "
                         f"per_class={per_class}, num_classes={classes}), found {found}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where}: its weights hold NaN or infinite values (damaged, or a diverged fit)")
    fusion = FusionWeights(space, num_classes=classes, per_class=per_class)
    with torch.no_grad():
        fusion.weight.copy_(weight.float())
    fusion.weight.requires_grad_(False)
    fusion.fit_info = dict(meta.get("fit") or {})
    return fusion


# ---------------------------------------------------------------------- fitting the weights


def _check_targets(outputs: Tensor, targets: Any, ignore_index: Optional[int], name: str = "targets") -> Tensor:
    expected = (outputs.shape[0],) + tuple(outputs.shape[3:])
    if not isinstance(targets, Tensor) or tuple(targets.shape) != expected or targets.is_floating_point() \
            or targets.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape {expected} (one class per "
                         f"{'image' if len(expected) == 1 else 'pixel'}), got {getattr(targets, 'dtype', type(targets).__name__)} "
                         f"{tuple(getattr(targets, 'shape', ()))}")
    targets = targets.long()
    keep = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    if keep.any():
        lo, hi = int(targets[keep].min()), int(targets[keep].max())
        if lo < 0 or hi >= outputs.shape[2]:
            raise ValueError(f"{name} must be class indices in [0, {outputs.shape[2] - 1}]"
                             f"{'' if ignore_index is None else f' or ignore_index {ignore_index}'}, got [{lo}, {hi}]")
    return targets


def _nll_and_correct(log_p: Tensor, targets: Tensor, ignore_index: Optional[int]) -> Tuple[Tensor, int, int]:
    """``(summed NLL, correct, counted)`` of log-probabilities ``(N, C, ...)`` at ``targets``."""
    keep = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    picked = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
    nll = -(picked * keep).sum()
    correct = int(((log_p.argmax(1) == targets) & keep).sum())
    return nll, correct, int(keep.sum())


def _check_views(outputs: Any, space: TransformSpace, validity: Any) -> None:
    if not isinstance(outputs, Tensor) or outputs.dim() < 3 or not outputs.is_floating_point():
        raise ValueError(f"outputs must be the views' float outputs (N, {len(space)}, classes, ...), got "
                         f"{getattr(outputs, 'dtype', type(outputs).__name__)} {tuple(getattr(outputs, 'shape', ()))}")
    if outputs.shape[1] != len(space):
        raise ValueError(f"outputs must hold one view per candidate of space {space.name!r} ({len(space)}), got "
                         f"{outputs.shape[1]} (outputs {tuple(outputs.shape)})")
    if outputs.shape[0] == 0:
        raise ValueError("outputs must hold at least one image, got none")
    if validity is not None and (not isinstance(validity, Tensor) or validity.shape[:2] != outputs.shape[:2]
                                 or validity.dim() != outputs.dim()):
        raise ValueError(f"validity must be (N, {len(space)}, 1, h, w) maps matching outputs {tuple(outputs.shape)}, "
                         f"got {tuple(getattr(validity, 'shape', ())) or type(validity).__name__}")


@torch.no_grad()
def fusion_nll(fusion: FusionWeights, outputs: Tensor, targets: Tensor, validity: Optional[Tensor] = None,
               ignore_index: Optional[int] = None) -> Dict[str, float]:
    """``{"nll", "accuracy"}`` of ``fusion`` on per-view ``outputs`` ``(N, T, C, ...)``: mean NLL
    of the fused probabilities at ``targets`` and the fraction of images (or labelled pixels)
    whose argmax is the target."""
    targets = _check_targets(outputs, targets, ignore_index)
    nll, correct, counted = _nll_and_correct(_log(fusion.fuse(outputs, validity)), targets, ignore_index)
    if counted == 0:
        raise ValueError("targets hold no labelled element (every one is ignore_index)")
    return {"nll": float(nll) / counted, "accuracy": correct / counted}


def fit_fusion(outputs: Tensor, targets: Tensor, space: Any, validity: Optional[Tensor] = None,
               per_class: bool = False, epochs: int = RECIPE["epochs"], lr: float = RECIPE["lr"],
               batch_size: int = RECIPE["batch_size"], seed: int = 0,
               ignore_index: Optional[int] = None) -> FusionWeights:
    """Fusion weights fitted on per-view outputs computed once, the model frozen.

    ``outputs`` ``(N, T, C)`` (classification) or ``(N, T, C, h, w)`` (de-augmented dense
    outputs): every candidate's view of each validation image, in ``space``'s order
    (:func:`collect_views`); ``validity`` their ``(N, T, 1, h, w)`` maps (dense); ``targets``
    ``(N,)`` or ``(N, h, w)`` class indices (``ignore_index``: unlabelled pixels).

    Adam (``lr``) on the weights, ``epochs`` passes over the images in shuffled batches of
    ``batch_size`` (``seed``), each step minimising the mean NLL of the fused probabilities over
    the batch's images (or labelled pixels) -- not a cross-entropy of the probabilities read as
    logits (module docstring). Defaults: the original recipe (:data:`RECIPE`; with 100 images,
    500 steps). ``fit_info`` records the recipe and the NLL and accuracy on the fit data of the
    uniform mean and of the fitted weights.
    """
    space = _space(space)
    _check_views(outputs, space, validity)
    targets = _check_targets(outputs, targets, ignore_index)
    epochs, batch_size = check_positive_int(epochs, "epochs"), check_positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    probs = outputs.detach().to(torch.float64 if outputs.dtype == torch.float64 else torch.float32).softmax(2)
    valid = None if validity is None else validity.detach().to(probs.dtype)
    fusion = FusionWeights(space, num_classes=outputs.shape[2], per_class=per_class).to(outputs.device)
    before = fusion_nll(fusion, outputs, targets, validity, ignore_index)
    optimizer = torch.optim.Adam([fusion.weight], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n, steps = outputs.shape[0], 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(outputs.device)
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                fused = _fuse(probs[rows], fusion.view_weights(), None if valid is None else valid[rows], per_class)
                nll, _, counted = _nll_and_correct(_log(fused), targets[rows], ignore_index)
                if counted == 0:  # a batch of unlabelled pixels only: nothing to learn from
                    continue
                optimizer.zero_grad()
                (nll / counted).backward()
                optimizer.step()
                steps += 1
    fusion.weight.requires_grad_(False)
    after = fusion_nll(fusion, outputs, targets, validity, ignore_index)
    fusion.fit_info = {"objective": "nll", "optimizer": "adam", "lr": float(lr), "epochs": epochs,
                       "batch_size": batch_size, "seed": seed, "steps": steps, "images": n,
                       "task": "classification" if outputs.dim() == 3 else "segmentation",
                       "uniform": before, "fitted": after}
    return fusion


@torch.no_grad()
def collect_views(wrapper: nn.Module, batches: Iterable[Tensor]) -> Dict[str, Optional[Tensor]]:
    """Run ``wrapper`` (any TTA wrapper, through its :meth:`run`) on each batch of model inputs
    and gather, on the CPU in float32: ``views`` ``(N, v, ...)`` (the views' outputs,
    de-augmented when dense), ``validity`` ``(N, v, 1, h, w)`` or ``None``, ``index`` ``(N, k)``
    (the chosen candidates) and ``losses`` ``(N, v)``: the predicted losses of the views (loss-guided
    wrappers; repeated for the flipped views, as the weighted merge uses them) or ``None``.

    What :func:`fit_fusion` (a full-space wrapper) and :func:`fit_weighted_temperature` (a
    loss-guided one) fit on: the model runs once per view, never again during the fit."""
    parts: Dict[str, List[Tensor]] = {"views": [], "validity": [], "index": [], "losses": []}
    for x in batches:
        r = wrapper.run(x)
        selection = r["selection"]
        parts["views"].append(r["views"].float().cpu())
        if r["validity"] is not None:
            parts["validity"].append(r["validity"].float().cpu())
        parts["index"].append(selection.index.cpu())
        if selection.predicted_losses is not None:
            chosen = selection.predicted_losses.float().gather(1, selection.index).cpu()
            parts["losses"].append(torch.cat([chosen, chosen], 1) if selection.flip else chosen)
    if not parts["views"]:
        raise ValueError("batches held no images")
    return {key: torch.cat(value) if value else None for key, value in parts.items()}


# ---------------------------------------------------------------------- the weighted merge's temperature


@torch.no_grad()
def weighted_merge_nll(views: Tensor, losses: Tensor, targets: Tensor, temperature: float,
                       validity: Optional[Tensor] = None, merge_space: str = "probs",
                       ignore_index: Optional[int] = None) -> float:
    """Mean NLL of ``merge_outputs(views, "weighted", losses, temperature, validity, merge_space)``
    read as logits (for ``"probs"``: the NLL of the weighted mixture of the views' probabilities)
    at ``targets`` (images, or labelled pixels)."""
    merged = merge_outputs(views, "weighted", losses=losses, temperature=temperature, weights=validity,
                           merge_space=merge_space)
    nll, _, counted = _nll_and_correct(merged.log_softmax(1), targets, ignore_index)
    if counted == 0:
        raise ValueError("targets hold no labelled element (every one is ignore_index)")
    return float(nll) / counted


def fit_weighted_temperature(views: Tensor, losses: Tensor, targets: Tensor, validity: Optional[Tensor] = None,
                             merge_space: str = "probs", ignore_index: Optional[int] = None,
                             decades: float = 3.0, grid_points: int = 61,
                             tol: float = 1e-4) -> Tuple[float, Dict[str, Any]]:
    """The temperature ``T`` of ``merge_mode="weighted"`` minimising :func:`weighted_merge_nll`.

    ``views`` ``(N, k, C, ...)``: the outputs of each image's ``k`` chosen views (de-augmented
    when dense, with ``validity``); ``losses`` ``(N, k)`` their predicted losses; ``targets``
    ``(N,)`` or ``(N, h, w)``. Search: ``grid_points`` temperatures log-spaced over
    ``decades`` decades either side of the median spread of the predicted losses within a row,
    then golden-section search in ``log T`` between the best grid point's neighbours down to a
    relative width ``tol`` (the NLL is smooth in ``log T``; the grid guards against a local
    minimum). Returns ``(T, info)``: ``info`` holds the NLL at ``T``, at ``T = 1`` and of the
    plain mean (``T`` -> inf), and ``at_bound`` when the best temperature is the grid's edge
    (the data prefer one view alone, or the mean). Needs ``k >= 2`` and losses that differ
    within some row (otherwise the temperature changes nothing).
    """
    merge_space = check_merge_space(merge_space)
    if not isinstance(views, Tensor) or views.dim() < 3 or not views.is_floating_point():
        raise ValueError(f"views must be float outputs (N, k, classes, ...), got "
                         f"{getattr(views, 'dtype', type(views).__name__)} {tuple(getattr(views, 'shape', ()))}")
    n, k = views.shape[:2]
    if k < 2:
        raise ValueError(f"the temperature weighs k >= 2 views; got k = {k} (views {tuple(views.shape)})")
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (n, k) or not losses.is_floating_point():
        raise ValueError(f"losses must be float predicted losses of shape (N, k) = {(n, k)}, got "
                         f"{tuple(getattr(losses, 'shape', ())) or type(losses).__name__}")
    targets = _check_targets(views, targets, ignore_index)
    grid_points = check_positive_int(grid_points, "grid_points")
    views = views.detach().double()
    losses = losses.detach().double()
    validity = None if validity is None else validity.detach().double()
    spread = (losses.max(1).values - losses.min(1).values)
    if not bool((spread > 0).any()):
        raise ValueError("the predicted losses are equal within every row: the temperature changes nothing")
    center = float(spread[spread > 0].median())

    def nll_at(log_t: float) -> float:
        return weighted_merge_nll(views, losses, targets, math.exp(log_t), validity, merge_space, ignore_index)

    lo, hi = math.log(center) - decades * math.log(10), math.log(center) + decades * math.log(10)
    grid = [lo + (hi - lo) * i / max(1, grid_points - 1) for i in range(grid_points)]
    values = [nll_at(g) for g in grid]
    best = min(range(grid_points), key=lambda i: values[i])
    a, b = grid[max(0, best - 1)], grid[min(grid_points - 1, best + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll_at(c), nll_at(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll_at(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll_at(d)
    log_t, nll = min([(grid[best], values[best]), (c, fc), (d, fd)], key=lambda p: p[1])
    temperature = math.exp(log_t)
    info = {"temperature": temperature, "nll": nll, "nll_at_1": nll_at(0.0), "nll_mean": nll_at(math.log(1e12)),
            "at_bound": best in (0, grid_points - 1), "loss_spread": center, "images": n, "k": k,
            "objective": "nll", "merge_space": merge_space}
    return temperature, info


def fitted_temperature(predictor: Any, k: int, flip: bool = False, merge_space: str = "probs") -> Optional[float]:
    """The temperature recorded with ``predictor`` for ``k`` views, ``flip`` and ``merge_space``
    (:func:`store_temperature`), or ``None``."""
    for entry in getattr(predictor, "merge_temperatures", None) or ():
        if entry["k"] == k and entry["flip"] == flip and entry["merge_space"] == merge_space:
            return float(entry["temperature"])
    return None


def store_temperature(predictor: nn.Module, temperature: float, info: Dict[str, Any], k: int,
                      flip: bool = False) -> None:
    """Record a temperature fitted by :func:`fit_weighted_temperature` (its ``info``) for a
    wrapper of ``k`` views (``flip``: plus their mirrors, ``2k`` views) with ``predictor`` (a
    :class:`~ttach_instance.predictors.LossPredictorBase`: saved in its checkpoint metadata),
    replacing one of the same ``k``, ``flip`` and ``merge_space``."""
    temperature = check_temperature(temperature)
    entries = getattr(predictor, "merge_temperatures", None)
    if not isinstance(entries, list):
        raise TypeError(f"predictor must be a loss predictor with merge_temperatures (a LossPredictorBase), got "
                        f"{type(predictor).__name__}")
    if not isinstance(flip, bool):
        raise TypeError(f"flip must be True or False, got {flip!r}")
    k = check_positive_int(k, "k")
    if not isinstance(info, dict) or info.get("merge_space") not in MERGE_SPACES or info.get("k") != (2 * k if flip else k):
        raise ValueError(f"info must be fit_weighted_temperature's for {2 * k if flip else k} views (k={k}, "
                         f"flip={flip}), got {info!r}")
    entry = {"k": k, "flip": flip, "merge_space": info["merge_space"], "temperature": temperature,
             "objective": info["objective"], "images": int(info["images"]), "nll": float(info["nll"]),
             "nll_at_1": float(info["nll_at_1"])}
    predictor.merge_temperatures = [e for e in entries if (e["k"], e["flip"], e["merge_space"])
                                    != (k, flip, entry["merge_space"])] + [entry]
