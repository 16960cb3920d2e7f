"""Classification wrappers: loss-guided top-k TTA and its baselines, as drop-in ``nn.Module``\\ s.

Each wrapper is called like the model (``wrapper(x, *args)``; ``x`` normalised as the model
wants it) and returns what the model returns: a tensor ``(B, ...)`` or, with
``output_label_key``, ``{key: merged}`` taken from a dict output (ttach's convention).

One forward of :class:`LossGuidedWrapper`, for ``B`` inputs and ``k`` views each:

1. ``x`` -> pixels in [0, 1] (:mod:`ttach_instance.normalization`; ``mean``/``std`` resolved
   from the arguments, the model's attributes or its timm config);
2. the predictor scores every candidate of its space on the pixels (it resizes them itself),
   without gradient; :func:`~ttach_instance.selection.select_topk` keeps the ``k`` lowest;
3. the views are built grouped by candidate (each candidate once, on its samples) and brought
   back to model input; the identity candidate takes ``x`` itself, so it is exact and free;
4. the model runs in chunks of ``chunk_size`` rows (default ``B``: ``k`` calls of ``B`` rows,
   like ttach -- on CPU stacking 12 views into one 12B batch measured 19x a plain call against
   12x for 12 calls; on accelerators a larger chunk is usually faster);
5. :func:`~ttach_instance.merge.merge_outputs` merges over the views.

**Row order of the model batch** (what the model and a forward hook see): *rank-major*, row
``j * B + i`` is sample ``i`` under its ``j``-th choice ``index[i, j]``. With the default
chunk size every model call therefore holds the ``B`` inputs in their order (the ``j``-th
choice of each), exactly like one of ttach's calls, so per-sample extra ``*args`` line up;
with another ``chunk_size`` they do not (pass only batch-independent extras then). With
``flip=True`` the horizontally flipped views follow as rows ``(k + j) * B + i``; the merge sees,
per sample, the ``k`` views then their ``k`` flips (``"Ours k + H-Flip"``: ``2k`` calls).
Note: the flip is of the *view* (``hflip(candidate(x))``), not the candidate of the flipped
image; the two agree for every candidate but rotations (where they swap sign).

**Gradient.** The model branch follows the caller's grad mode (no ``torch.no_grad`` is
forced); the predictor and the selection never carry a gradient.

**Devices.** Everything stays on the input's device. On CPU the views are grouped on the
host (``torch.unique``: free there); on accelerators, for spaces of built-in ops, they are
built per row (``space.apply(..., grouped=False)``) with no host synchronisation; the forward
has no ``.item()``, ``.cpu()`` or ``.tolist()`` on accelerator tensors.

**ttach.** Any of our spaces plugs into ttach itself: ``ttach.ClassificationTTAWrapper(model,
space.to_ttach())`` runs every candidate (what :class:`FullSpaceWrapper` does, chunked and in
pixel space); ttach's own ``Compose`` becomes a space with ``TransformSpace.from_ttach``, and
the wrappers here accept a ``ttach.Compose`` wherever they take a space.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .merge import check_merge_mode, check_temperature, merge_outputs
from .normalization import resolve_mean_std, to_model_input, to_pixels
from .selection import check_k, select_oracle, select_random, select_topk
from .space import TransformSpace

__all__ = ["Selection", "LossGuidedWrapper", "RandomKWrapper", "OracleKWrapper", "FullSpaceWrapper"]


@dataclass(frozen=True)
class Selection:
    """What a wrapper chose: ``index`` ``(B, k)`` (best first); ``predicted_losses`` ``(B, T)``
    (the predictor's scores of every candidate, :class:`LossGuidedWrapper`); ``true_losses``
    ``(B, T)`` (:class:`OracleKWrapper`); ``flip``: the flipped views were added. Also readable
    as a mapping: ``selection["index"]``."""

    index: Tensor
    predicted_losses: Optional[Tensor] = None
    true_losses: Optional[Tensor] = None
    flip: bool = False

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(f"{key!r}; a Selection has {self.keys()}")
        return getattr(self, key)

    def keys(self) -> List[str]:
        return [f.name for f in fields(self)]


def resolve_space(space: Any, name: str = "space") -> TransformSpace:
    """A :class:`TransformSpace` from a space, a registered name (``"paper12"``) or a ``ttach.Compose``."""
    if isinstance(space, TransformSpace):
        return space
    if isinstance(space, str):
        from .registry import get_space

        return get_space(space)
    try:
        import ttach

        if isinstance(space, ttach.Compose):
            return TransformSpace.from_ttach(space)
    except ImportError:  # pragma: no cover - ttach is a dependency
        pass
    raise TypeError(f"{name} must be a TransformSpace, a registered space name or a ttach.Compose, got {type(space).__name__}")


def _check_chunk_size(chunk_size: Any) -> Optional[int]:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per model call) or None (the batch size), got {chunk_size!r}")
    return chunk_size


class _TTABase(nn.Module):
    """Shared machinery: pixels, views grouped by candidate, chunked model calls, merge."""

    _needs_losses_for_weighted = True

    def __init__(
        self,
        model: Callable[..., Any],
        space: Any,
        k: int,
        merge_mode: str = "mean",
        mean: Any = None,
        std: Any = None,
        chunk_size: Optional[int] = None,
        temperature: float = 1.0,
        output_label_key: Optional[str] = None,
        flip: bool = False,
        return_selection: bool = False,
    ):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        self.model = model
        self.space = resolve_space(space)
        self.k = check_k(k, len(self.space), self.space.name)
        self.merge_mode = check_merge_mode(merge_mode)
        if self.merge_mode == "weighted" and not self._needs_losses_for_weighted:
            raise ValueError(f"merge_mode 'weighted' weighs views by predicted losses, which {type(self).__name__} "
                             f"does not have; use one of mean, gmean, sum, max, min, tsharpen")
        self.temperature = check_temperature(temperature)
        self.mean, self.std = resolve_mean_std(model, mean, std)
        self.chunk_size = _check_chunk_size(chunk_size)
        self.output_label_key = output_label_key
        if not isinstance(flip, bool):
            raise TypeError(f"flip must be True or False, got {flip!r}")
        self.flip = flip
        self.return_selection = bool(return_selection)
        self._identity = torch.tensor([c.is_identity for c in self.space.candidates])
        self._identity_dev: dict = {}

    # ------------------------------------------------------------------ input / output
    def _check_input(self, x: Any) -> Tensor:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} expects images as a tensor (B, C, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} expects images of shape (B, C, H, W), got a {x.dim()}-d tensor {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} expects floating-point images (normalised as the model wants), got dtype "
                            f"{x.dtype}; convert uint8 images with x.float() / 255 (and normalise)")
        for label, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, x.shape[1]):
                raise ValueError(f"{name}: images have {x.shape[1]} channels but the model's normalisation {label} has "
                                 f"{len(values)} values ({values})")
        return x

    def _output(self, out: Any, rows: int) -> Tensor:
        key = self.output_label_key
        if key is not None:
            if not isinstance(out, Mapping):
                raise TypeError(f"output_label_key={key!r} was given but the model returned {type(out).__name__}, not a dict")
            if key not in out:
                raise KeyError(f"output_label_key {key!r} is not among the model's outputs {list(out)}")
            out = out[key]
        elif isinstance(out, Mapping):
            raise TypeError(f"the model returned a dict (keys {list(out)}); pass output_label_key= naming the output to merge")
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != rows:
            raise ValueError(f"the model must return a tensor with one row per input ({rows}), got "
                             f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        return out

    def _wrap(self, merged: Tensor, selection: Selection) -> Any:
        result = {self.output_label_key: merged} if self.output_label_key is not None else merged
        return (result, selection) if self.return_selection else result

    # ------------------------------------------------------------------ views and model calls
    def _is_identity(self, device: torch.device) -> Tensor:
        t = self._identity_dev.get(device)
        if t is None:
            t = self._identity_dev[device] = self._identity.to(device)
        return t

    def _views(self, x: Tensor, pixels: Tensor, index: Tensor) -> Tensor:
        """Model inputs of the selected views, rank-major: row ``j * B + i`` = sample ``i``
        under candidate ``index[i, j]``."""
        b, k = index.shape
        flat = index.t().reshape(-1)
        if x.device.type != "cpu" and self.space.row_plan() is not None:
            # Per-row kernels: no data-dependent shapes, no host synchronisation.
            views = to_model_input(self.space.apply(pixels.repeat(k, 1, 1, 1), flat[:, None], grouped=False),
                                   self.mean, self.std)
            # The identity view is the input itself (bit-exact, no normalisation round trip).
            same = self._is_identity(x.device)[flat][:, None, None, None]
            return torch.where(same, x.repeat(k, 1, 1, 1), views)
        groups = torch.unique(flat).tolist()  # host-side grouping: free on CPU
        if len(groups) == 1 and k == 1:  # one candidate covers the batch: no gather, no copy
            return self._candidate_views(groups[0], x, pixels)
        out = torch.empty((b * k,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        for c in groups:
            rows = (flat == c).nonzero().squeeze(1)
            src = rows % b
            out[rows] = self._candidate_views(c, x[src], pixels[src])
        return out

    def _candidate_views(self, c: int, x: Tensor, pixels: Tensor) -> Tensor:
        cand = self.space.candidates[c]
        if cand.is_identity:
            return x
        views = cand.apply(pixels)
        # A fresh tensor that no autograd graph holds can be normalised in place.
        fresh = views.untyped_storage().data_ptr() != pixels.untyped_storage().data_ptr()
        inplace = fresh and not (torch.is_grad_enabled() and views.requires_grad)
        return to_model_input(views, self.mean, self.std, inplace=inplace).to(x.dtype)

    def _call_model(self, views: Tensor, b: int, args: Tuple, kwargs: dict, flip: bool = False) -> Tensor:
        n = views.shape[0]
        chunk = self.chunk_size or max(b, 1)
        outs = []
        for start in range(0, max(n, 1), chunk):
            part = views[start:start + chunk]
            if flip:
                part = part.flip(-1)
            outs.append(self._output(self.model(part, *args, **kwargs), part.shape[0]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run(self, x: Tensor, pixels: Tensor, index: Tensor, args: Tuple, kwargs: dict,
             losses: Optional[Tensor] = None) -> Tensor:
        """Views of ``index`` -> model -> merge; ``losses`` ``(B, k)`` for the weighted merge."""
        b, k = index.shape
        views = self._views(x, pixels, index)
        out = self._call_model(views, b, args, kwargs)
        per_view = out.reshape((k, b) + out.shape[1:])
        if self.flip:
            flipped = self._call_model(views, b, args, kwargs, flip=True).reshape(per_view.shape)
            per_view = torch.cat([per_view, flipped], 0)
            if losses is not None:
                losses = torch.cat([losses, losses], 1)
        outputs = per_view.transpose(0, 1)  # (B, k or 2k, ...)
        return merge_outputs(outputs, self.merge_mode, losses=losses if self.merge_mode == "weighted" else None,
                             temperature=self.temperature)

    def _pixels(self, x: Tensor) -> Tensor:
        # Not detached: the views (and so the model branch) keep the caller's gradient.
        return to_pixels(x, self.mean, self.std)

    def extra_repr(self) -> str:
        return (f"space={self.space.name!r} ({len(self.space)} candidates), k={self.k}, merge_mode={self.merge_mode!r}, "
                f"flip={self.flip}, chunk_size={self.chunk_size}")


class LossGuidedWrapper(_TTABase):
    """Instance-aware TTA: per input, the ``k`` candidates with the lowest predicted loss.

    ``predictor``: ``pixels (B, 3, H, W) in [0, 1] -> (B, |T|)`` relative losses (lower is
    better) with a ``.space`` (a :class:`~ttach_instance.predictor.LossPredictor`,
    :class:`~ttach_instance.models.SmallLossPredictor`). ``space`` defaults to
    ``predictor.space``; if given it must be the space the predictor was trained for (same
    fingerprint). ``mean``/``std``: the model's input normalisation (default: resolved from the
    model, see :func:`~ttach_instance.normalization.resolve_mean_std`). ``merge_mode``: ttach's
    modes or ``"weighted"`` (softmax of negative predicted losses over the chosen views, with
    ``temperature``). ``flip``: add the horizontal flip of every chosen view (``2k`` calls).
    ``return_selection``: return ``(output, Selection)``. See the module docstring.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        predictor: Callable[[Tensor], Tensor],
        k: int = 1,
        merge_mode: str = "mean",
        mean: Any = None,
        std: Any = None,
        chunk_size: Optional[int] = None,
        temperature: float = 1.0,
        output_label_key: Optional[str] = None,
        flip: bool = False,
        return_selection: bool = False,
        space: Any = None,
    ):
        if not callable(predictor):
            raise TypeError(f"predictor must be callable (a LossPredictor), got {type(predictor).__name__}")
        pspace = getattr(predictor, "space", None)
        pfp = getattr(predictor, "space_fingerprint", None) or getattr(pspace, "fingerprint", None)
        pname = getattr(pspace, "name", None) or getattr(predictor, "space_name", None)
        if space is None:
            if pspace is None:
                raise ValueError("space= is required: the predictor has no .space telling which candidates it scores")
            space = pspace
        space = resolve_space(space)
        if pfp is not None and pfp != space.fingerprint:
            raise ValueError(
                f"the predictor was trained for space {pname!r} (fingerprint {pfp}) but the wrapper was given space "
                f"{space.name!r} (fingerprint {space.fingerprint}); use the predictor's own space or retrain it"
            )
        super().__init__(model, space, k, merge_mode, mean, std, chunk_size, temperature, output_label_key, flip,
                         return_selection)
        self.predictor = predictor

    def _predictor_dtype(self) -> Optional[torch.dtype]:
        if isinstance(self.predictor, nn.Module):
            for p in self.predictor.parameters():
                return p.dtype if p.is_floating_point() else None
        return None

    def predict_losses(self, x: Tensor) -> Tensor:
        """The predictor's scores ``(B, |T|)`` of every candidate for model inputs ``x``."""
        return self._scores(self._pixels(self._check_input(x)))

    def _scores(self, pixels: Tensor) -> Tensor:
        if pixels.shape[0] == 0:  # an empty batch: nothing to score (the model still runs once, on 0 rows)
            return pixels.new_zeros((0, len(self.space)), dtype=torch.float32)
        with torch.no_grad():
            dtype = self._predictor_dtype()
            pixels = pixels.detach()
            scores = self.predictor(pixels if dtype is None or dtype == pixels.dtype else pixels.to(dtype))
        t = len(self.space)
        if not isinstance(scores, Tensor) or scores.shape != (pixels.shape[0], t) or not scores.is_floating_point():
            raise ValueError(f"the predictor must return float scores of shape (B, {t}) for space {self.space.name!r}, "
                             f"got {getattr(scores, 'dtype', type(scores).__name__)} {tuple(getattr(scores, 'shape', ()))}")
        return scores

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        x = self._check_input(x)
        pixels = self._pixels(x)
        scores = self._scores(pixels)
        index = select_topk(scores, self.k)
        losses = scores.gather(1, index) if self.merge_mode == "weighted" else None
        merged = self._run(x, pixels, index, args, kwargs, losses)
        return self._wrap(merged, Selection(index=index, predicted_losses=scores, flip=self.flip))


class RandomKWrapper(_TTABase):
    """Baseline: ``k`` distinct candidates per input, drawn uniformly at random.

    Generator semantics: a CPU ``torch.Generator`` seeded with ``seed`` at construction; every
    forward advances it (successive calls draw new candidates, like one random stream), and
    :meth:`reset` re-seeds it, after which the same inputs give the same outputs again. Draws
    are made on the CPU and moved to the input's device, so a seed picks the same candidates
    on every device. ``merge_mode="weighted"`` is not available (there are no predicted losses).
    """

    _needs_losses_for_weighted = False

    def __init__(self, model: Callable[..., Any], space: Any, k: int = 1, seed: int = 0, merge_mode: str = "mean",
                 mean: Any = None, std: Any = None, chunk_size: Optional[int] = None,
                 output_label_key: Optional[str] = None, flip: bool = False, return_selection: bool = False):
        super().__init__(model, space, k, merge_mode, mean, std, chunk_size, 1.0, output_label_key, flip,
                         return_selection)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self, seed: Optional[int] = None) -> None:
        """Re-seed the generator (with ``seed``, default the constructor's)."""
        if seed is not None:
            self.seed = seed
        self.generator.manual_seed(self.seed)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        x = self._check_input(x)
        pixels = self._pixels(x)
        index = select_random(x.shape[0], len(self.space), self.k, generator=self.generator, device=x.device)
        merged = self._run(x, pixels, index, args, kwargs)
        return self._wrap(merged, Selection(index=index, flip=self.flip))


def _cross_entropy(outputs: Tensor, target: Tensor) -> Tensor:
    return TF.cross_entropy(outputs, target, reduction="none")


class OracleKWrapper(_TTABase):
    """Upper bound: the ``k`` candidates with the lowest *true* loss, which needs the labels:
    ``wrapper(x, target, *args)``. Every candidate is run (``|T|`` model calls of ``B`` rows by
    default); the chosen views' outputs are merged (no further call).

    ``loss_fn(outputs, targets) -> (N,)`` per-sample losses (default: cross entropy with
    ``reduction="none"``); ``targets`` are ``target`` repeated per candidate in the model
    batch's row order. ``merge_mode="weighted"`` weighs the chosen views by their true losses.
    """

    def __init__(self, model: Callable[..., Any], space: Any, k: int = 1,
                 loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, merge_mode: str = "mean",
                 mean: Any = None, std: Any = None, chunk_size: Optional[int] = None, temperature: float = 1.0,
                 output_label_key: Optional[str] = None, return_selection: bool = False):
        super().__init__(model, space, k, merge_mode, mean, std, chunk_size, temperature, output_label_key, False,
                         return_selection)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> per-sample losses, got {loss_fn!r}")
        self.loss_fn = loss_fn or _cross_entropy

    def forward(self, x: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> Any:
        x = self._check_input(x)
        if not isinstance(target, Tensor) or target.shape[:1] != x.shape[:1]:
            raise ValueError(f"target must be a tensor with one entry per input ({x.shape[0]}), got "
                             f"{tuple(getattr(target, 'shape', ())) or type(target).__name__}")
        b, t = x.shape[0], len(self.space)
        index_all = torch.arange(t, device=x.device).expand(b, t)
        out = self._call_model(self._views(x, self._pixels(x), index_all), b, args, kwargs)
        with torch.no_grad():
            losses = self.loss_fn(out.detach(), target.repeat((t,) + (1,) * (target.dim() - 1)))
        if not isinstance(losses, Tensor) or losses.shape != (t * b,):
            raise ValueError(f"loss_fn must return per-sample losses of shape ({t * b},) (reduction='none'), got "
                             f"{tuple(getattr(losses, 'shape', ())) or type(losses).__name__}")
        true = losses.reshape(t, b).t().float()
        index = select_oracle(true, self.k)
        per_view = out.reshape((t, b) + out.shape[1:]).transpose(0, 1)  # (B, T, ...)
        chosen = per_view[torch.arange(b, device=x.device)[:, None], index]
        merged = merge_outputs(chosen, self.merge_mode, temperature=self.temperature,
                               losses=true.gather(1, index) if self.merge_mode == "weighted" else None)
        return self._wrap(merged, Selection(index=index, true_losses=true))


class FullSpaceWrapper(_TTABase):
    """Conventional TTA over the whole space: every candidate on every input, merged (ttach's
    ``ClassificationTTAWrapper`` over ``space.to_ttach()``, but views built grouped in pixel space
    and the model called in chunks of ``chunk_size`` rows; default ``|T|`` calls of ``B`` rows)."""

    _needs_losses_for_weighted = False

    def __init__(self, model: Callable[..., Any], space: Any, merge_mode: str = "mean", mean: Any = None,
                 std: Any = None, chunk_size: Optional[int] = None, output_label_key: Optional[str] = None,
                 return_selection: bool = False):
        space = resolve_space(space)
        super().__init__(model, space, len(space), merge_mode, mean, std, chunk_size, 1.0, output_label_key, False,
                         return_selection)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        x = self._check_input(x)
        index = torch.arange(len(self.space), device=x.device).expand(x.shape[0], -1)
        merged = self._run(x, self._pixels(x), index, args, kwargs)
        return self._wrap(merged, Selection(index=index))
