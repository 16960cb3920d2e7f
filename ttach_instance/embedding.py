"""Mean-embedding TTA (MeTTA; Ashukha et al., 2021): average a layer's features over views.

A classifier's linear head trained on embeddings of single augmented views can be applied to
the *mean* embedding of several views of the test image; MeTTA reports this beats averaging
the views' predictions for linear probes and k-NN. :class:`EmbeddingTTAWrapper` returns that
mean (and optionally the variance across views) of one named layer's features.

Views come from

* a transform space (a :class:`~ttach_instance.space.TransformSpace`, a registered name or a
  ``ttach.Compose``): every candidate, through :class:`~ttach_instance.wrappers.FullSpaceWrapper`;
* a space and a loss predictor with ``k``: each image's ``k`` best candidates, selected by
  :class:`~ttach_instance.wrappers.LossGuidedWrapper` itself;
* a sampler, :class:`RandomResizedCropSampler`: ``S`` random draws of a training-style
  augmentation (torchvision's random resized crop, resized back, and a random flip).

Spatial features ``(N, C, h, w)`` are first brought back to the input frame (the space's
``deaugment``, or for sampled crops the crop's affine map through ``grid_sample``), so a
feature cell of every view sits over the input pixels it describes; then they are averaged per
cell over the views that saw it and pooled over the cells some view saw. ``deaugment=False``
pools every view as it is and averages the pooled vectors (MeTTA's own rule, which keeps all
of a small crop's cells). Pooled features ``(N, C)`` are averaged as they are.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import functional as F
from .normalization import resolve_mean_std, to_model_input
from .space import TransformSpace
from .wrappers import FullSpaceWrapper, LossGuidedWrapper, TTAWrapper, resolve_space

__all__ = ["EmbeddingTTAWrapper", "LayerFeatures", "RandomResizedCropSampler"]

CAPTURES = ("output", "input")


class _Captured(Exception):
    """Raised by the hook once the layer has run: the rest of the model is not computed."""


class LayerFeatures(nn.Module):
    """``model`` cut at the module named ``layer`` (``dict(model.named_modules())[layer]``):
    ``forward(x)`` returns that module's output (``capture="output"``) or its first input
    (``"input"``, e.g. the pooled embedding a linear head receives). The model stops there (a
    forward hook, removed after each call), so the layers after it cost nothing."""

    def __init__(self, model: nn.Module, layer: str, capture: str = "output"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (its layers are looked up by name), got {type(model).__name__}")
        if not isinstance(layer, str) or not layer:
            raise TypeError(f"layer must be the name of one of the model's modules (a non-empty str), got {layer!r}")
        modules = dict(model.named_modules())
        if layer not in modules:
            names = [n for n in modules if n]
            close = difflib.get_close_matches(layer, names, n=3)
            hint = f"; did you mean {close}?" if close else ""
            shown = names if len(names) <= 12 else names[:6] + ["..."] + names[-6:]
            raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}{hint} Its modules "
                             f"(model.named_modules()): {shown}")
        if capture not in CAPTURES:
            raise ValueError(f"capture must be one of {list(CAPTURES)}, got {capture!r}")
        self.model, self.layer, self.capture = model, layer, capture
        self._module = modules[layer]

    def forward(self, x: Tensor) -> Tensor:
        found: Dict[str, Any] = {}

        def hook(_module, inputs, output):
            found["value"] = output if self.capture == "output" else (inputs[0] if inputs else None)
            raise _Captured

        handle = self._module.register_forward_hook(hook)
        try:
            self.model(x)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "value" not in found:
            raise RuntimeError(f"layer {self.layer!r} did not run in {type(self.model).__name__}'s forward, so it has "
                               f"no features; pick a module the forward calls")
        value = found["value"]
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] != x.shape[0]:
            raise ValueError(f"layer {self.layer!r} {self.capture} must be a tensor with one row per input "
                             f"({x.shape[0]}), got {getattr(value, 'dtype', type(value).__name__)} "
                             f"{tuple(getattr(value, 'shape', ()))}")
        return value


def _pair_of(value: Any, name: str, low: float, high: float) -> Tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not low < lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} < min <= max <= {high}, got {value!r}")
    return lo, hi


class RandomResizedCropSampler:
    """``n_views`` random training-style views per image: torchvision v2's
    ``RandomResizedCrop`` parameters (``scale``, ``ratio``; its own sampling code) for a crop
    resized back to the input size (``v2.functional.resized_crop``, antialiased bilinear), then
    a horizontal flip with probability ``flip_p``. The same role as a space in
    :class:`EmbeddingTTAWrapper`, but every view is a fresh draw, with its affine map.

    Generator semantics as :class:`~ttach_instance.wrappers.RandomKWrapper`: a CPU generator
    seeded with ``seed`` feeds every draw (torchvision's sampler runs under
    ``torch.random.fork_rng`` seeded from it, so the global RNG is untouched), each call
    advances it, :meth:`reset` re-seeds it: a seed gives the same views on every device.
    """

    def __init__(self, n_views: int = 8, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5, seed: int = 0):
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            raise ValueError(f"n_views must be a positive int (views per image), got {n_views!r}")
        self.n_views = n_views
        self.scale = _pair_of(scale, "scale", 0.0, 1.0)
        self.ratio = _pair_of(ratio, "ratio", 0.0, math.inf)
        if isinstance(flip_p, bool) or not isinstance(flip_p, (int, float)) or not 0 <= flip_p <= 1:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {flip_p!r}")
        self.flip_p = float(flip_p)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n_views

    def __repr__(self) -> str:
        return (f"RandomResizedCropSampler(n_views={self.n_views}, scale={self.scale}, ratio={self.ratio}, "
                f"flip_p={self.flip_p}, seed={self.seed})")

    def reset(self, seed: Optional[int] = None) -> None:
        """Re-seed the generator (with ``seed``, default the constructor's)."""
        if seed is not None:
            self.seed = seed
        self.generator.manual_seed(self.seed)

    def draw(self, batch: int, height: int, width: int) -> Tensor:
        """``(batch * n_views, 5)`` int64 rows ``(top, left, crop height, crop width, flip)``,
        sample-major (row ``i * n_views + s`` is view ``s`` of image ``i``)."""
        from torchvision.transforms import v2

        crop = v2.RandomResizedCrop((height, width), scale=self.scale, ratio=self.ratio, antialias=True)
        probe = torch.empty(1, height, width)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))
        rows = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(batch * self.n_views):
                p = crop.make_params([probe])
                flip = bool(torch.rand(1) < self.flip_p)
                rows.append((p["top"], p["left"], p["height"], p["width"], int(flip)))
        return torch.tensor(rows, dtype=torch.int64).view(batch * self.n_views, 5)

    @staticmethod
    def thetas(params: Tensor, height: int, width: int) -> Tensor:
        """``(N, 2, 3)`` view->input maps of drawn ``params`` (crop then flip)."""
        top, left, h, w, flip = params.to(torch.float64).unbind(1)
        crop = F.crop_theta(torch.stack([left, top, left + w, top + h], 1), height, width)
        flips = F.flip_theta(flip > 0, torch.zeros_like(flip, dtype=torch.bool))
        return F.compose_theta(flips, crop)  # the crop first, then the flip

    def views(self, pixels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(views (B * n_views, C, H, W), view->input maps (B * n_views, 2, 3), drawn params
        (B * n_views, 5))`` of pixels in [0, 1], sample-major; views and maps on the pixels' device."""
        from torchvision.transforms.v2 import functional as TVF

        b, _, h, w = pixels.shape
        params = self.draw(b, h, w)
        out = []
        for r, (top, left, ch, cw, flip) in enumerate(params.tolist()):
            view = TVF.resized_crop(pixels[r // self.n_views], top, left, ch, cw, [h, w], antialias=True)
            out.append(view.flip(-1) if flip else view)
        views = torch.stack(out) if out else pixels.new_zeros((0,) + tuple(pixels.shape[1:]))
        return views.clamp_(0, 1), self.thetas(params, h, w).to(pixels.device), params


class EmbeddingTTAWrapper(nn.Module):
    """The mean embedding of ``model``'s ``layer`` over views of each input (MeTTA).

    Args:
        model: the network (takes normalised images, like the wrappers).
        views: a space (:class:`~ttach_instance.space.TransformSpace`, registered name such as
            ``"flips"``, or ``ttach.Compose``) -- every candidate, or with ``predictor`` each
            input's ``k`` best -- or a sampler (:class:`RandomResizedCropSampler`). ``None``
            with a predictor: the predictor's space.
        layer: the name of a module of ``model`` (``dict(model.named_modules())``).
        capture: ``"output"`` of that module, or its first ``"input"``.
        predictor, k: a loss predictor and how many of its lowest-scored candidates to use
            (selected by :class:`~ttach_instance.wrappers.LossGuidedWrapper`).
        deaugment: spatial features go back to the input frame before averaging (module
            docstring); ``False``: each view pooled as it is, then averaged.
        return_variance: ``forward`` returns ``(mean, variance)``; the variance (over views,
            divided by the number of views) is of the views' pooled embeddings.
        mean, std: the model's input normalisation (default: resolved from the model).
        chunk_size: rows per model call (:class:`~ttach_instance.wrappers.TTAWrapper`).

    ``forward(x)`` -> ``(B, C)`` (and ``(B, C)`` variance); :meth:`run` also returns the
    views' pooled embeddings ``(B, v, C)`` and what chose them.
    """

    def __init__(self, model: nn.Module, views: Any = None, layer: Optional[str] = None, capture: str = "output",
                 predictor: Optional[Callable[[Tensor], Tensor]] = None, k: Optional[int] = None,
                 deaugment: bool = True, return_variance: bool = False, mean: Any = None, std: Any = None,
                 chunk_size: Optional[int] = None):
        super().__init__()
        if layer is None:
            raise TypeError("layer= is required: the name of the module whose features are averaged "
                            "(one of model.named_modules())")
        self.features = LayerFeatures(model, layer, capture)
        for name, value in (("deaugment", deaugment), ("return_variance", return_variance)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.deaugment, self.return_variance = deaugment, return_variance
        self.mean, self.std = resolve_mean_std(model, mean, std)
        norm = {"mean": self.mean, "std": self.std, "chunk_size": chunk_size}
        self.sampler: Optional[RandomResizedCropSampler] = None
        if isinstance(views, RandomResizedCropSampler):
            if predictor is not None or k is not None:
                raise ValueError("predictor= and k= select among a space's candidates; a sampler draws its own views")
            self.sampler = views
            self.pipeline: TTAWrapper = FullSpaceWrapper(self.features, "identity", merge_space="logits", **norm)
        elif predictor is not None:
            if k is None:
                raise ValueError("k= is required with a predictor: how many of its best candidates to average")
            self.pipeline = LossGuidedWrapper(self.features, predictor, k=k, merge_space="logits", space=views, **norm)
        else:
            if k is not None:
                raise ValueError("k= needs predictor=: without one every candidate of the space is used")
            if views is None:
                raise ValueError("views= is required: a space (name, TransformSpace, ttach.Compose) or a sampler")
            self.pipeline = FullSpaceWrapper(self.features, resolve_space(views, "views"), merge_space="logits",
                                             **norm)

    @property
    def space(self) -> Optional[TransformSpace]:
        return None if self.sampler is not None else self.pipeline.space

    @property
    def n_views(self) -> int:
        return len(self.sampler) if self.sampler is not None else self.pipeline.k

    def run(self, x: Tensor) -> Dict[str, Any]:
        """``mean`` ``(B, C)``, ``variance`` ``(B, C)``, ``views`` ``(B, v, C)`` (each view's pooled
        embedding), ``selection`` (the pipeline's :class:`~ttach_instance.wrappers.Selection`, or
        the sampler's drawn parameters ``(B * v, 5)``) and ``thetas`` (sampled views' maps)."""
        p = self.pipeline
        x = TTAWrapper._check_input(self, x)  # the wrappers' input checks, naming this class
        pixels = TTAWrapper._pixels(self, x)
        b, (h, w) = x.shape[0], tuple(x.shape[-2:])
        if self.sampler is not None:
            views, thetas, selection = self.sampler.views(pixels)
            feats = p._call_model(to_model_input(views, self.mean, self.std).to(x.dtype), b, (), {})

            def back(f: Tensor) -> Tuple[Tensor, Tensor]:
                return F.deaugment_dense(f, thetas.to(f.device), fill="zero")
        else:
            thetas = None
            index, _, selection = p.select(x, pixels)
            per_view, _ = p.view_outputs(x, pixels, index)
            feats = per_view.flatten(0, 1)

            def back(f: Tensor) -> Tuple[Tensor, Tensor]:
                return p.space.deaugment(f, index, fill="zero", image_size=(h, w))
        mean, per_view_emb = self._reduce(feats, b, back)
        variance = per_view_emb.var(1, unbiased=False)
        return {"mean": mean, "variance": variance, "views": per_view_emb, "selection": selection, "thetas": thetas}

    def _reduce(self, feats: Tensor, b: int, back: Callable[[Tensor], Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        """``(mean (B, C), per-view pooled embeddings (B, v, C))`` of the views' features."""
        v = feats.shape[0] // max(b, 1)
        if feats.dim() == 2:
            per_view = feats.view(b, v, -1)
            return per_view.mean(1), per_view
        if feats.dim() != 4:
            raise ValueError(f"layer {self.features.layer!r} gives features of shape {tuple(feats.shape[1:])}; "
                             f"expected pooled (C,) or spatial (C, h, w) features")
        if not self.deaugment:
            per_view = feats.mean((2, 3)).view(b, v, -1)
            return per_view.mean(1), per_view
        maps, valid = back(feats)
        maps = maps.view((b, v) + tuple(maps.shape[1:]))
        valid = valid.to(maps.dtype).view((b, v) + tuple(valid.shape[1:]))
        weighted = maps * valid
        per_view = weighted.sum((-2, -1)) / valid.sum((-2, -1)).clamp_min(1e-12)
        cover = valid.sum(1)  # (B, 1, h, w): how many views saw each cell
        cell_mean = weighted.sum(1) / cover.clamp_min(1e-12)
        seen = (cover > 0).to(maps.dtype)
        pooled = (cell_mean * seen).sum((-2, -1)) / seen.sum((-2, -1)).clamp_min(1)
        return pooled, per_view

    def forward(self, x: Tensor) -> Any:
        r = self.run(x)
        return (r["mean"], r["variance"]) if self.return_variance else r["mean"]

    def extra_repr(self) -> str:
        source = repr(self.sampler) if self.sampler is not None else (
            f"space={self.pipeline.space.name!r}, k={self.pipeline.k}")
        return (f"layer={self.features.layer!r} ({self.features.capture}), {source}, deaugment={self.deaugment}, "
                f"return_variance={self.return_variance}")
