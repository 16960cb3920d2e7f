"""One TTA pipeline for every task, and its presets: loss-guided top-k, random-k, full space.

Every wrapper is called like the model (``wrapper(x, *args)``; ``x`` normalised as the model
wants it) and returns what the model returns: a tensor, or ``{output_key: merged}`` taken from
a dict output (ttach's ``output_label_key`` / ``output_mask_key``). One forward, for ``B``
inputs and ``k`` views each:

1. ``x`` -> pixels in [0, 1] (``mean``/``std`` resolved from the arguments, the model's
   attributes or its timm config, for every task); pixels outside [0, 1] or non-finite are
   refused (0-255 or unnormalised input would otherwise turn every view white);
2. select ``index`` ``(B, k)``: the predictor's ``k`` lowest predicted losses
   (:class:`LossGuidedWrapper`), ``k`` random candidates, or every candidate;
3. ``space.apply`` builds the views, **sample-major**: row ``i * k + j`` is sample ``i`` under
   ``index[i, j]``; the identity candidate takes ``x`` itself (exact, free);
4. the model runs in chunks: ``chunk_size=None`` calls it once per rank ``j`` on the ``B``
   views ``index[:, j]`` -- each call holds the inputs in their order, like one of ttach's
   calls, so per-sample extra ``*args`` line up; an int runs chunks of that many rows
   (batch-independent extras only). On CPU, ``k`` calls of ``B`` rows measured faster than one
   call of ``kB`` rows (docs/BENCHMARKS.md); on accelerators a larger chunk usually is faster;
5. dense outputs (``dense=True``: segmentation) go back to the input frame through
   ``space.deaugment`` with a validity map, on the outputs' device;
6. ``merge_outputs`` merges the views (validity maps as weights): ``merge_mode`` is the rule
   (ttach's modes or ``"weighted"``), ``merge_space`` what is averaged -- ``"probs"`` (the
   default: the views' softmax probabilities, returned as their logarithm so the output stays
   logit-like; the paper's rule and what the evaluation measures), ``"log_probs"`` or
   ``"logits"`` (the raw outputs, ttach's behaviour; use it for outputs that are not class
   scores).

``flip=True`` adds the horizontal flip of every chosen view (``"Ours + H-Flip"``: ``2k``
views per sample, the ``k`` views then their ``k`` flips); the flip is of the *view*.

**Gradient.** The model branch follows the caller's grad mode; the predictor and the
selection never carry a gradient. **Devices.** Everything stays on the input's device; on
accelerators the forward has no ``.item()``, ``.cpu()`` or ``.tolist()`` (views per row, inverse
maps cached on the device, selection by ``torch.sort``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as F
from .fusion import FusionWeights, fitted_temperature, load_fusion
from .merge import check_merge_mode, check_merge_space, check_temperature, merge_outputs
from .normalization import resolve_mean_std, to_model_input, to_pixels
from .selection import check_k, select_random, select_topk
from .space import TransformSpace

__all__ = ["Selection", "TTAWrapper", "LossGuidedWrapper", "RandomKWrapper", "FullSpaceWrapper",
           "LossGuidedSegmentationWrapper", "RandomKSegmentationWrapper", "SegmentationTTAWrapper", "resolve_space"]

COVERAGE_MODES = ("extrapolate", "identity", "zero")
INTERPOLATIONS = ("bilinear", "nearest")
UNCERTAINTY_MODES = ("variance", "entropy")


@dataclass(frozen=True)
class Selection:
    """What a wrapper chose: ``index`` ``(B, k)`` (best first); ``predicted_losses`` ``(B, T)``
    (the predictor's scores, loss-guided wrappers); ``true_losses`` ``(B, T)`` (the oracle);
    ``flip``: the flipped views were added. Also readable as a mapping: ``selection["index"]``."""

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
    """A :class:`TransformSpace` from a space, a ``ttach.Compose`` or a reference that
    :func:`ttach_instance.get_space` resolves: a registered name (``"paper12"``), a name with
    parameters (``"five_crops:crop_size=0.8"``) or a policy file (``"runs/gps.json:n=4"``)."""
    if isinstance(space, TransformSpace):
        return space
    if isinstance(space, (str, os.PathLike)):
        from .registry import get_space

        return get_space(space)
    import ttach

    if isinstance(space, ttach.Compose):
        return TransformSpace.from_ttach(space)
    raise TypeError(f"{name} must be a TransformSpace, a registered space name, a policy file path or a "
                    f"ttach.Compose, got {type(space).__name__}")


def _strided(size: Tuple[int, int], image: Tuple[int, int]) -> bool:
    """Whether an output of ``size`` is ``image`` divided by one integer stride (floor or ceil, as
    strided heads round: 33 -> 17 at stride 2)."""
    (h, w), (height, width) = size, image
    if h < 1 or w < 1:
        return False
    stride = max(1, round(height / h))
    return all(n in (side // stride, -(-side // stride)) for n, side in ((h, height), (w, width)))


def _choice(value: Any, choices: Tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


class TTAWrapper(nn.Module):
    """The pipeline: select -> ``space.apply`` -> model (chunked) -> [``space.deaugment``] ->
    ``merge_outputs``. Presets subclass it and implement :meth:`select`.

    Args:
        model: the wrapped model (takes normalised images, returns ``(N, ...)`` or a dict).
        space: a :class:`TransformSpace`, a registered name or a ``ttach.Compose``.
        k: views per input.
        merge_mode: ttach's modes (``mean``, ``gmean``, ``sum``, ``max``, ``min``, ``tsharpen``) or
            ``"weighted"`` (softmax of the negative predicted losses, ``temperature``; the loss-guided
            presets given no temperature use the one fitted with the predictor for their ``k``,
            ``flip`` and ``merge_space`` -- :func:`~ttach_instance.fusion.fit_weighted_temperature` --
            else 1).
        merge_space: ``"probs"`` (default), ``"log_probs"`` or ``"logits"``: see the module docstring.
        mean, std: the model's input normalisation (default: resolved from the model).
        chunk_size: rows per model call (``None``: one call per rank of ``B`` rows).
        output_key: the key of the output to merge when the model returns a dict.
        flip: add the horizontal flip of every chosen view.
        dense: the outputs are per-pixel ``(N, K, h, w)`` maps to de-augment (segmentation).
        interpolation: resampling of dense outputs (``"bilinear"``, or ``"nearest"`` to keep every
            value an actual model output).
        coverage: dense pixels no chosen view saw get the views' nearest covered value
            (``"extrapolate"``), the identity view's output (``"identity"``: one more model call of
            ``B`` rows) or 0 (``"zero"``).
        return_selection: return ``(output, Selection)``.
        fusion: learned fusion weights (:class:`~ttach_instance.fusion.FusionWeights` or its file) in
            place of the uniform merge; only for presets that run every candidate of the space
            (``fixed_views``), whose space the weights must be fitted for.
    """

    #: Whether :meth:`select` yields the predicted losses that ``merge_mode="weighted"`` needs.
    has_losses = False
    #: Whether every input gets every candidate of the space, in order (what ``fusion=`` weighs).
    fixed_views = False
    #: Where ``temperature`` came from: ``"argument"``; loss-guided presets given none: ``"fitted"``
    #: (recorded with the predictor) or ``"default"`` (1).
    temperature_source = "argument"

    def __init__(self, model: Callable[..., Any], space: Any, k: int, merge_mode: str = "mean",
                 merge_space: str = "probs", mean: Any = None, std: Any = None, chunk_size: Optional[int] = None,
                 temperature: float = 1.0, output_key: Optional[str] = None, flip: bool = False, dense: bool = False,
                 interpolation: str = "bilinear", coverage: str = "extrapolate", return_selection: bool = False,
                 fusion: Any = None):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        self.model = model
        self.space = resolve_space(space)
        self.k = check_k(k, len(self.space), self.space.name)
        self.merge_mode = check_merge_mode(merge_mode)
        if self.merge_mode == "weighted" and not self.has_losses:
            raise ValueError(f"merge_mode 'weighted' weighs views by predicted losses, which {type(self).__name__} "
                             f"does not have; use one of mean, gmean, sum, max, min, tsharpen")
        self.merge_space = check_merge_space(merge_space)
        self.temperature = check_temperature(temperature)
        self.mean, self.std = resolve_mean_std(model, mean, std)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int (rows per model call) or None (one call per rank "
                             f"of B rows), got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.output_key = output_key
        for name, value in (("flip", flip), ("dense", dense)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.flip, self.dense = flip, dense
        self.interpolation = _choice(interpolation, INTERPOLATIONS, "interpolation")
        self.coverage = _choice(coverage, COVERAGE_MODES, "coverage")
        if dense:
            self.space.check_invertible()
        self.return_selection = bool(return_selection)
        self._identity = torch.tensor([c.is_identity for c in self.space.candidates])
        self._identity_on: Dict[str, Tensor] = {}
        self.fusion = None if fusion is None else self._bind_fusion(fusion)

    def _bind_fusion(self, fusion: Any) -> FusionWeights:
        name = type(self).__name__
        if not self.fixed_views or self.k != len(self.space):
            raise ValueError(f"fusion= weighs every candidate of a fixed space, but {name} chooses {self.k} of "
                             f"{len(self.space)} candidates per input (top-k); use FullSpaceWrapper or "
                             f"SegmentationTTAWrapper, or merge_mode='weighted' for loss-weighted views")
        if self.flip:
            raise ValueError("fusion= weighs the space's candidates; flip=True adds views it has no weights for: use "
                             "a space that holds the flips (e.g. 'flips')")
        if self.merge_mode != "mean" or self.merge_space != "probs":
            raise ValueError(f"fusion= replaces the merge (its weights average probabilities); leave merge_mode "
                             f"and merge_space at 'mean' and 'probs', got {self.merge_mode!r}, {self.merge_space!r}")
        if not isinstance(fusion, FusionWeights):
            if not isinstance(fusion, (str, os.PathLike)):
                raise TypeError(f"fusion must be FusionWeights or the path of a fusion weights file, got "
                                f"{type(fusion).__name__}")
            return load_fusion(fusion, space=self.space)
        if fusion.space_fingerprint != self.space.fingerprint:
            raise ValueError(f"the fusion weights were fitted for space {fusion.space.name!r} (fingerprint "
                             f"{fusion.space_fingerprint}) but {name} runs space {self.space.name!r} (fingerprint "
                             f"{self.space.fingerprint})")
        return fusion

    # ------------------------------------------------------------------ selection (presets)
    def select(self, x: Tensor, pixels: Tensor, *args: Any, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor], Selection]:
        """``(index (B, k), predicted losses of the chosen views (B, k) or None, Selection)``."""
        raise NotImplementedError

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

    def _pixels(self, x: Tensor) -> Tensor:
        """``x`` un-normalised, checked to be finite pixels in [0, 1] (on CPU; on accelerators
        an asynchronous device assertion, no host synchronisation)."""
        pixels = to_pixels(x, self.mean, self.std)  # not detached: views keep the caller's gradient
        norm = f"mean={self.mean}, std={self.std}" if self.mean is not None else "no normalisation"
        what = f"{type(self).__name__}: the input un-normalised ({norm})"
        if pixels.numel() and pixels.device.type == "cpu":
            if not F.in_unit_range(pixels):  # one read of the batch, whatever its layout; false for NaN
                lo, hi = torch.aminmax(pixels.detach())
                raise ValueError(f"{what} holds values in [{float(lo):.4g}, {float(hi):.4g}], not finite pixels in "
                                 f"[0, 1]: pass images normalised as the model expects (0-255 input: divide by 255 "
                                 f"first), or give the wrapper the model's mean= and std=")
        elif pixels.numel():
            torch._assert_async(((pixels >= -1e-3) & (pixels <= 1 + 1e-3)).all(),
                                f"{what} is not finite pixels in [0, 1]")
        F.check_images(pixels, "pixels", check_range=False)
        return pixels

    def _output(self, out: Any, rows: int, height: int, width: int) -> Tensor:
        key = self.output_key
        if key is not None:
            if not isinstance(out, Mapping):
                raise TypeError(f"output key {key!r} was given but the model returned {type(out).__name__}, not a dict")
            if key not in out:
                raise KeyError(f"output key {key!r} is not among the model's outputs {list(out)}")
            out = out[key]
        elif isinstance(out, Mapping):
            raise TypeError(f"the model returned a dict (keys {list(out)}); pass the key of the output to merge "
                            f"(output_label_key= / output_mask_key=)")
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != rows or not out.is_floating_point():
            raise ValueError(f"the model must return a float tensor with one row per input ({rows}), got "
                             f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
        if self.dense and not (out.dim() == 4 and _strided(out.shape[-2:], (height, width))):
            raise ValueError(f"a dense (segmentation) model must return (N, K, h, w) maps of the input's size "
                             f"{height}x{width} or that size divided by one integer stride (rounded up or down), "
                             f"got {tuple(out.shape)}")
        return out

    def _wrap(self, merged: Tensor, selection: Selection) -> Any:
        result = {self.output_key: merged} if self.output_key is not None else merged
        return (result, selection) if self.return_selection else result

    # ------------------------------------------------------------------ views and model calls
    def _identity_rows(self, flat: Tensor) -> Tensor:
        key = str(flat.device)
        if key not in self._identity_on:
            self._identity_on[key] = self._identity.to(flat.device)
        return self._identity_on[key][flat]

    def _model_inputs(self, x: Tensor, pixels: Tensor, index: Tensor) -> Tensor:
        """Model inputs of the views, sample-major ``(B * k, C, H, W)``; identity rows are ``x``."""
        b, k = index.shape
        same = self._identity_rows(index.reshape(-1))
        if x.device.type == "cpu" and bool(same.all()):  # every view is the input itself: no copy at all
            return x if k == 1 else x.repeat_interleave(k, 0)
        views = self.space.apply(pixels, index)  # on accelerators without a host synchronisation
        inplace = not (torch.is_grad_enabled() and views.requires_grad) and views is not pixels
        model_in = to_model_input(views, self.mean, self.std, inplace=inplace).to(x.dtype)
        source = x if k == 1 else x.repeat_interleave(k, 0)
        if x.device.type == "cpu":
            rows = same.nonzero().squeeze(1)
            if rows.numel():
                model_in[rows] = source[rows]
            return model_in
        return torch.where(same[:, None, None, None], source, model_in)

    def _call(self, inputs: Tensor, args: Tuple, kwargs: Dict, height: int, width: int) -> Tensor:
        return self._output(self.model(inputs, *args, **kwargs), inputs.shape[0], height, width)

    def _call_model(self, inputs: Tensor, b: int, args: Tuple, kwargs: Dict) -> Tensor:
        """The model on sample-major rows ``(B * v, ...)``: one call per rank, or chunks."""
        n, (h, w) = inputs.shape[0], inputs.shape[-2:]
        if n == 0:
            return self._call(inputs, args, kwargs, h, w)
        if self.chunk_size is not None:
            outs = [self._call(inputs[s:s + self.chunk_size], args, kwargs, h, w) for s in range(0, n, self.chunk_size)]
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        v = n // b
        if v == 1:
            return self._call(inputs, args, kwargs, h, w)
        grid = inputs.view((b, v) + tuple(inputs.shape[1:]))
        # A channels-last batch stays channels-last (CPU convolutions run markedly faster on it).
        layout = torch.channels_last if inputs.dim() == 4 and not inputs.is_contiguous() and \
            inputs.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        outs = [self._call(grid[:, j].contiguous(memory_format=layout), args, kwargs, h, w) for j in range(v)]
        return torch.stack(outs, 1).flatten(0, 1)

    def run(self, x: Tensor, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """The whole pipeline with its intermediate results: ``output`` (merged), ``selection``,
        ``views`` ``(B, v, ...)`` (the views' outputs, de-augmented when dense; ``v = k``, or ``2k``
        with ``flip``), ``validity`` ``(B, v, 1, h, w)`` (dense; ones otherwise ``None``) and, dense,
        ``coverage`` ``(B, 1, h, w)`` (summed validity)."""
        x = self._check_input(x)
        pixels = self._pixels(x)
        index, losses, selection = self.select(x, pixels, *args, **kwargs)
        per_view, validity = self.view_outputs(x, pixels, index, args, kwargs)
        if self.flip and losses is not None:
            losses = torch.cat([losses, losses], 1)
        merged, coverage = self.merge(per_view, validity, losses, x, args, kwargs)
        return {"output": merged, "selection": selection, "views": per_view, "validity": validity,
                "coverage": coverage}

    def view_outputs(self, x: Tensor, pixels: Tensor, index: Tensor, args: Tuple = (),
                     kwargs: Optional[Dict] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """The model's outputs of the views of ``index``: ``(B, v, ...)`` (de-augmented with validity
        ``(B, v, 1, h, w)`` when dense), ``v = k`` or ``2k`` with ``flip``."""
        kwargs = kwargs or {}
        b, k = index.shape
        inputs = self._model_inputs(x, pixels, index)
        outs = [self._call_model(inputs, b, args, kwargs)]
        if self.flip:
            flipped = self._call_model(inputs.flip(-1), b, args, kwargs)
            outs.append(flipped.flip(-1) if self.dense else flipped)
        validity = None
        if self.dense:
            fill = "border" if self.coverage == "extrapolate" else "zero"
            pairs = [self.space.deaugment(o, index, mode=self.interpolation, fill=fill,
                                          image_size=tuple(pixels.shape[-2:])) for o in outs]
            outs = [p[0] for p in pairs]
            validity = torch.cat([p[1].view((b, k) + tuple(p[1].shape[1:])) for p in pairs], 1)
        per_view = torch.cat([o.view((b, k) + tuple(o.shape[1:])) for o in outs], 1)
        return per_view, validity

    def merge(self, per_view: Tensor, validity: Optional[Tensor], losses: Optional[Tensor], x: Tensor,
              args: Tuple = (), kwargs: Optional[Dict] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``merge_outputs`` over the views (validity as weights) or the learned ``fusion``, and the
        dense coverage; with ``coverage="identity"`` uncovered pixels take the identity view's
        output (one more call)."""
        if self.fusion is not None:
            merged = self.fusion(per_view, validity)
        else:
            merged = merge_outputs(per_view, self.merge_mode, losses=losses if self.merge_mode == "weighted" else None,
                                   temperature=self.temperature, weights=validity, merge_space=self.merge_space)
        if validity is None:
            return merged, None
        coverage = validity.sum(1)
        if self.coverage == "identity":
            plain = self._call_model(x, x.shape[0], args, kwargs or {})
            fallback = merge_outputs(plain[:, None], "mean", merge_space=self.merge_space)
            merged = torch.where(coverage > 0, merged, fallback)
        return merged, coverage

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        r = self.run(x, *args, **kwargs)
        return self._wrap(r["output"], r["selection"])

    def extra_repr(self) -> str:
        return (f"space={self.space.name!r} ({len(self.space)} candidates), k={self.k}, merge_mode={self.merge_mode!r}, "
                f"merge_space={self.merge_space!r}, flip={self.flip}, dense={self.dense}, chunk_size={self.chunk_size}"
                + (f", temperature={self.temperature:.4g} ({self.temperature_source})" if self.merge_mode == "weighted"
                   else ""))


# ---------------------------------------------------------------------- selections


class _LossGuided(TTAWrapper):
    has_losses = True

    @staticmethod
    def _temperature(predictor: Any, temperature: Optional[float], k: int, flip: bool,
                     merge_space: str) -> Tuple[float, str]:
        """``temperature`` if given, else the one fitted for this ``k``, ``flip`` and ``merge_space``
        and recorded with the predictor (:func:`~ttach_instance.fusion.fit_weighted_temperature`),
        else 1; with its source."""
        if temperature is not None:
            return temperature, "argument"
        fitted = fitted_temperature(predictor, k, flip, merge_space)
        return (1.0, "default") if fitted is None else (fitted, "fitted")

    def _bind_predictor(self, predictor: Any, space: Any) -> TransformSpace:
        if not callable(predictor):
            raise TypeError(f"predictor must be callable (a loss predictor), got {type(predictor).__name__}")
        pspace = getattr(predictor, "space", None)
        if space is None:
            if pspace is None:
                raise ValueError("space= is required: the predictor has no .space telling which candidates it scores")
            space = pspace
        space = resolve_space(space)
        pfp = getattr(predictor, "space_fingerprint", None) or getattr(pspace, "fingerprint", None)
        if pfp is not None and pfp != space.fingerprint:
            raise ValueError(f"the predictor was trained for space {getattr(pspace, 'name', None)!r} (fingerprint {pfp}) "
                             f"but the wrapper was given space {space.name!r} (fingerprint {space.fingerprint}); use "
                             f"the predictor's own space or retrain it")
        return space

    def predict_losses(self, x: Tensor) -> Tensor:
        """The predictor's scores ``(B, T)`` of every candidate for model inputs ``x``."""
        return self._scores(self._pixels(self._check_input(x)))

    def _scores(self, pixels: Tensor) -> Tensor:
        t = len(self.space)
        if pixels.shape[0] == 0:
            return pixels.new_zeros((0, t), dtype=torch.float32)
        dtype = next((p.dtype for p in self.predictor.parameters() if p.is_floating_point()), None) \
            if isinstance(self.predictor, nn.Module) else None
        with torch.no_grad():
            pixels = pixels.detach()
            scores = self.predictor(pixels if dtype is None or dtype == pixels.dtype else pixels.to(dtype))
        if not isinstance(scores, Tensor) or scores.shape != (pixels.shape[0], t) or not scores.is_floating_point():
            raise ValueError(f"the predictor must return float scores of shape (B, {t}) for space {self.space.name!r}, "
                             f"got {getattr(scores, 'dtype', type(scores).__name__)} {tuple(getattr(scores, 'shape', ()))}")
        return scores

    def select(self, x, pixels, *args, **kwargs):
        scores = self._scores(pixels)
        index = select_topk(scores, self.k)
        losses = scores.gather(1, index) if self.merge_mode == "weighted" else None
        return index, losses, Selection(index=index, predicted_losses=scores, flip=self.flip)


class _RandomK(TTAWrapper):
    """Generator semantics: a CPU ``torch.Generator`` seeded with ``seed``; every forward advances
    it, :meth:`reset` re-seeds it. Draws happen on the CPU, so a seed picks the same candidates
    on every device."""

    def _seed(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self, seed: Optional[int] = None) -> None:
        """Re-seed the generator (with ``seed``, default the constructor's)."""
        if seed is not None:
            self.seed = seed
        self.generator.manual_seed(self.seed)

    def select(self, x, pixels, *args, **kwargs):
        index = select_random(x.shape[0], len(self.space), self.k, generator=self.generator, device=x.device)
        return index, None, Selection(index=index, flip=self.flip)


class _FullSpace(TTAWrapper):
    fixed_views = True

    def select(self, x, pixels, *args, **kwargs):
        index = torch.arange(len(self.space), device=x.device).expand(x.shape[0], -1)
        return index, None, Selection(index=index, flip=self.flip)


# ---------------------------------------------------------------------- classification presets


class LossGuidedWrapper(_LossGuided):
    """Instance-aware TTA: per input, the ``k`` candidates with the lowest predicted loss.

    ``predictor``: ``pixels (B, 3, H, W) in [0, 1] -> (B, |T|)`` relative losses (lower is
    better) with a ``.space`` (any :mod:`ttach_instance.predictors` predictor); ``space``, if
    given, must be the predictor's (same fingerprint). ``output_label_key``: merge that entry of
    a dict output. Other arguments: :class:`TTAWrapper`.
    """

    def __init__(self, model: Callable[..., Any], predictor: Callable[[Tensor], Tensor], k: int = 1,
                 merge_mode: str = "mean", merge_space: str = "probs", mean: Any = None, std: Any = None,
                 chunk_size: Optional[int] = None, temperature: Optional[float] = None,
                 output_label_key: Optional[str] = None, flip: bool = False, return_selection: bool = False,
                 space: Any = None):
        space = self._bind_predictor(predictor, space)
        temperature, source = self._temperature(predictor, temperature, k, flip, merge_space)
        super().__init__(model, space, k, merge_mode, merge_space, mean, std, chunk_size, temperature,
                         output_label_key, flip, return_selection=return_selection)
        self.predictor = predictor
        self.temperature_source = source


class RandomKWrapper(_RandomK):
    """Baseline: ``k`` distinct candidates per input, drawn uniformly at random (``seed``)."""

    def __init__(self, model: Callable[..., Any], space: Any, k: int = 1, seed: int = 0, merge_mode: str = "mean",
                 merge_space: str = "probs", mean: Any = None, std: Any = None, chunk_size: Optional[int] = None,
                 output_label_key: Optional[str] = None, flip: bool = False, return_selection: bool = False):
        super().__init__(model, space, k, merge_mode, merge_space, mean, std, chunk_size, 1.0, output_label_key, flip,
                         return_selection=return_selection)
        self._seed(seed)


class FullSpaceWrapper(_FullSpace):
    """Conventional TTA over the whole space: every candidate on every input, merged (ttach's
    ``ClassificationTTAWrapper`` over ``space.to_ttach()``, with views built in pixel space), or
    fused with learned weights (``fusion=``, :mod:`ttach_instance.fusion`)."""

    def __init__(self, model: Callable[..., Any], space: Any, merge_mode: str = "mean", merge_space: str = "probs",
                 mean: Any = None, std: Any = None, chunk_size: Optional[int] = None,
                 output_label_key: Optional[str] = None, flip: bool = False, return_selection: bool = False,
                 fusion: Any = None):
        space = resolve_space(space)
        super().__init__(model, space, len(space), merge_mode, merge_space, mean, std, chunk_size, 1.0,
                         output_label_key, flip, return_selection=return_selection, fusion=fusion)


# ---------------------------------------------------------------------- segmentation presets


class _Dense:
    """Mixin of the segmentation presets: per-pixel uncertainty across the views."""

    def forward_with_uncertainty(self, images: Tensor, *args: Any, **kwargs: Any) -> Tuple[Any, Tensor]:
        """``(output, uncertainty (B, 1, H, W))``: ``"variance"``, the validity-weighted variance of
        the views' class probabilities summed over classes; ``"entropy"``, the entropy (nats) of
        the merged class probabilities."""
        r = self.run(images, *args, **kwargs)
        views, validity = r["views"], r["validity"]
        merged_probs = r["output"].softmax(1)
        if self.uncertainty == "entropy":
            unc = -(merged_probs * merged_probs.clamp_min(1e-12).log()).sum(1, keepdim=True)
        else:
            probs = views.softmax(2)
            den = validity.sum(1).clamp_min(1e-12)
            mean = (validity * probs).sum(1) / den
            unc = ((validity * (probs - mean[:, None]) ** 2).sum(1) / den).sum(1, keepdim=True)
        return self._wrap(r["output"], r["selection"]), unc


def _dense_kwargs(interpolation: str, coverage: str, uncertainty: str) -> Dict[str, Any]:
    _choice(uncertainty, UNCERTAINTY_MODES, "uncertainty")
    return {"dense": True, "interpolation": interpolation, "coverage": coverage}


class LossGuidedSegmentationWrapper(_Dense, _LossGuided):
    """Loss-guided TTA for models returning per-pixel logits ``(B, K, H, W)`` (or a dict holding
    them under ``output_mask_key``): the ``k`` best candidates per image, each view's output
    warped back to the input frame, merged weighted by validity. Arguments: :class:`TTAWrapper`;
    ``uncertainty`` for :meth:`forward_with_uncertainty`."""

    def __init__(self, model: Callable[..., Any], predictor: Callable[[Tensor], Tensor], space: Any = None, k: int = 1,
                 merge_mode: str = "mean", merge_space: str = "probs", mean: Any = None, std: Any = None,
                 chunk_size: Optional[int] = None, temperature: Optional[float] = None,
                 output_mask_key: Optional[str] = None, flip: bool = False, interpolation: str = "bilinear",
                 coverage: str = "extrapolate", uncertainty: str = "variance", return_selection: bool = False):
        space = self._bind_predictor(predictor, space)
        temperature, source = self._temperature(predictor, temperature, k, flip, merge_space)
        super().__init__(model, space, k, merge_mode, merge_space, mean, std, chunk_size, temperature, output_mask_key,
                         flip, return_selection=return_selection, **_dense_kwargs(interpolation, coverage, uncertainty))
        self.predictor = predictor
        self.uncertainty = uncertainty
        self.temperature_source = source


class RandomKSegmentationWrapper(_Dense, _RandomK):
    """Baseline for segmentation: ``k`` distinct candidates per image drawn at random (``seed``)."""

    def __init__(self, model: Callable[..., Any], space: Any, k: int = 1, seed: int = 0, merge_mode: str = "mean",
                 merge_space: str = "probs", mean: Any = None, std: Any = None, chunk_size: Optional[int] = None,
                 output_mask_key: Optional[str] = None, flip: bool = False, interpolation: str = "bilinear",
                 coverage: str = "extrapolate", uncertainty: str = "variance", return_selection: bool = False):
        super().__init__(model, space, k, merge_mode, merge_space, mean, std, chunk_size, 1.0, output_mask_key, flip,
                         return_selection=return_selection, **_dense_kwargs(interpolation, coverage, uncertainty))
        self._seed(seed)
        self.uncertainty = uncertainty


class SegmentationTTAWrapper(_Dense, _FullSpace):
    """Conventional segmentation TTA: every candidate of ``space`` (default ``"d4"``), outputs
    de-augmented and merged with validity weights -- arbitrary rotations, zooms and crops
    included, which ttach's ``SegmentationTTAWrapper`` cannot de-augment. ``fusion=``: learned
    fusion weights in place of the uniform mean (:mod:`ttach_instance.fusion`)."""

    def __init__(self, model: Callable[..., Any], space: Any = "d4", merge_mode: str = "mean",
                 merge_space: str = "probs", mean: Any = None, std: Any = None, chunk_size: Optional[int] = None,
                 output_mask_key: Optional[str] = None, flip: bool = False, interpolation: str = "bilinear",
                 coverage: str = "extrapolate", uncertainty: str = "variance", return_selection: bool = False,
                 fusion: Any = None):
        space = resolve_space(space)
        super().__init__(model, space, len(space), merge_mode, merge_space, mean, std, chunk_size, 1.0,
                         output_mask_key, flip, return_selection=return_selection, fusion=fusion,
                         **_dense_kwargs(interpolation, coverage, uncertainty))
        self.uncertainty = uncertainty
