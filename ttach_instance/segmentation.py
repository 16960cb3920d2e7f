"""Test-time augmentation for segmentation: loss-guided top-k, conventional TTA, baselines.

Every wrapper here takes a model that maps images ``(B, C, H, W)`` to dense per-pixel logits
``(B, K, H, W)`` -- or to a dict holding them under ``output_mask_key`` (ttach's convention)
-- and returns the same: a tensor, or a dict ``{output_mask_key: merged}``.

One forward, for ``B`` images and ``k`` views each:

1. choose ``index`` ``(B, k)`` (predictor top-k, all candidates, random, or oracle);
2. ``space.apply`` builds the ``B * k`` views (sample-major) in one batch;
3. the model runs once on all views (or in fixed-size chunks, ``chunk_size``);
4. every view's output is brought back to the input frame by :func:`deaugment_views`: one
   batched ``grid_sample`` with the per-row inverse maps of the candidates (photometric
   candidates pass through untouched), plus a validity map -- 1 where the view saw the
   input pixel, 0 where it did not (rotation corners, zoom-in borders, outside a crop);
5. :func:`merge_views` averages the views weighted by validity, ``sum(v x) / sum(v)``.

**Interpolation.** Logits are resampled ``bilinear`` by default: the merge is a mean of
logits, and a bilinear resample is a mean of neighbouring logits, so both are linear and
commute. ``interpolation="nearest"`` keeps every value an actual model output (use it for
outputs where blending is meaningless, e.g. instance ids in a float tensor). Flips, quarter
turns and photometric candidates land on exact pixel centres and come back unchanged either
way. Values are sampled with border padding, so a pixel whose centre the view covers is not
darkened by zero padding within half a pixel of the view's edge.

**Coverage.** A pixel no selected view covers (``k = 1`` with ``zoom(1.2)`` chosen: the
outer ~8 % band on each side) gets, per ``coverage``:

* ``"extrapolate"`` (default): the nearest covered value of the views (the inverse warp
  with border padding, averaged over the views): no extra model call, cost stays ``k``.
* ``"identity"``: the identity view's output at that pixel. The identity view of every
  image rides along in the same model call (``B * (k + 1)`` rows, no host sync); the cost
  is ``k + 1`` forwards. It is used only where no selected view covers the pixel.
* ``"zero"``: 0 logits (the plain validity-weighted mean; ``coverage`` output tells where).

Measured on the Tiny ImageNet box-segmentation example (docs/BENCHMARKS.md, "Segmentation"):
``"extrapolate"`` and ``"identity"`` give the same mIoU to within the run's noise, so the
default keeps the cost at ``k`` forwards.

**Devices.** Everything after the model call stays on the output's device: no ``.cpu()``,
``.item()``, ``.tolist()``, NumPy or data-dependent shapes in this module's forward path.
On accelerators, views are built by :func:`apply_views`: ``space.apply(..., grouped=False)``
(per-row family kernels) when the space has a row plan, otherwise every candidate on every
image and a device-side gather (flips, quarter turns, crops); selection is ``torch.topk``;
de-augmentation indexes per-candidate inverse maps cached on the device. On CPU the grouped
paths are used (each candidate once on its own images: less work). The sync-free claim for
the view-building step rests on ``ttach_instance.functional``'s per-row kernels; the test
``test_cuda_forward_does_not_synchronise`` checks the whole forward under
``torch.cuda.set_sync_debug_mode("error")`` where a GPU is present (none was available when
this was written: it is skipped on CPU-only machines).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as TF
from torch import Tensor

from .space import TransformSpace

COVERAGE_MODES = ("extrapolate", "identity", "zero")
INTERPOLATIONS = ("bilinear", "nearest")
UNCERTAINTY_MODES = ("variance", "entropy")
MERGE_MODES = ("mean", "probs")
LOSS_KINDS = ("ce", "dice")

__all__ = [
    "apply_views",
    "deaugment_views",
    "merge_views",
    "segmentation_loss",
    "view_losses",
    "segmentation_metrics",
    "ConfusionMatrix",
    "SegmentationTask",
    "SegmentationTTAWrapper",
    "LossGuidedSegmentationWrapper",
    "RandomKSegmentationWrapper",
    "OracleKSegmentationWrapper",
]


# --------------------------------------------------------------------------- helpers


def _resolve_space(space: Any, name: str = "space") -> TransformSpace:
    if isinstance(space, TransformSpace):
        return space
    if isinstance(space, str):
        from .registry import get_space

        return get_space(space)
    try:  # a ttach.Compose
        import ttach

        if isinstance(space, ttach.Compose):
            return TransformSpace.from_ttach(space)
    except ImportError:  # pragma: no cover - ttach is a dependency
        pass
    raise TypeError(f"{name} must be a TransformSpace, a registered space name or a ttach.Compose, got {type(space).__name__}")


def _check_choice(value: Any, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _identity_index(space: TransformSpace) -> Optional[int]:
    for i, c in enumerate(space.candidates):
        if c.is_identity:
            return i
    return None


class _DeaugTables:
    """Per-candidate inverse maps cached per (height, width, device): built once, then only
    indexed on the device (no host round trip in the forward path)."""

    def __init__(self, space: TransformSpace):
        self.space = space
        self._cache: Dict[Tuple[int, int, str], Optional[Tuple[Tensor, Tensor]]] = {}

    def get(self, height: int, width: int, device: torch.device) -> Optional[Tuple[Tensor, Tensor]]:
        key = (height, width, str(device))
        if key not in self._cache:
            table = self.space.thetas(height, width, "cpu")
            if table is None:
                self._cache[key] = None
            else:
                from .functional import invert_theta

                inverse = invert_theta(table.to(torch.float64)).to(torch.float32)
                moved = torch.tensor([c.geometric for c in self.space.candidates])
                self._cache[key] = (inverse.to(device), moved.to(device))
        return self._cache[key]


def apply_views(space: TransformSpace, pixels: Tensor, index: Tensor) -> Tensor:
    """``space.apply(pixels, index)`` -> ``(B * k, C, H, W)``, without host synchronisation on
    accelerators: per-row family kernels when the space has a row plan, otherwise every
    candidate on every image (a static loop over the space) and a device-side gather of the
    selected rows -- cheap for flips, quarter turns and crops, the ops without a row form.
    On CPU: the grouped path (each candidate once on its own images)."""
    if pixels.device.type == "cpu":
        return space.apply(pixels, index, grouped=True)
    if space.row_plan() is not None:
        return space.apply(pixels, index, grouped=False)
    idx = space.check_index(index, pixels.shape[0], pixels.device)
    b, k = idx.shape
    every = torch.stack([cand.apply(pixels) for cand in space.candidates], 1)  # (B, T, C, H, W)
    rows = torch.arange(b, device=pixels.device)[:, None].expand(b, k)
    return every[rows, idx].reshape((b * k,) + tuple(pixels.shape[1:]))


def deaugment_views(
    outputs: Tensor,
    space: TransformSpace,
    index: Tensor,
    interpolation: str = "bilinear",
    fill: str = "zero",
    tables: Optional[_DeaugTables] = None,
    image_size: Optional[Tuple[int, int]] = None,
) -> Tuple[Tensor, Tensor]:
    """Bring dense view outputs ``(B * k, K, h, w)`` (rows as ``space.apply(images, index)``
    made them) back to the input frame: returns ``(outputs, validity)`` with validity
    ``(B * k, 1, h, w)`` in the outputs' float dtype.

    ``fill="zero"`` leaves 0 where the view did not see the pixel; ``fill="border"`` puts the
    nearest covered value there (border padding of the inverse warp). Spaces whose every
    candidate has an affine map are de-augmented in one ``grid_sample`` without host
    synchronisation; others go through ``space.deaugment`` (grouped, host-side selection).

    ``image_size``: ``(H, W)`` of the images the views were made from, when the outputs have
    another resolution (a stride-4 head): the maps are built for the image (pixel-exact crop
    boxes) and, being in normalised coordinates, applied at the outputs' resolution.
    """
    _check_choice(interpolation, INTERPOLATIONS, "interpolation")
    _check_choice(fill, ("zero", "border"), "fill")
    if not isinstance(outputs, Tensor) or outputs.dim() != 4 or not outputs.is_floating_point():
        raise TypeError(
            f"outputs must be dense float logits (N, K, h, w), got "
            f"{getattr(outputs, 'dtype', type(outputs).__name__)} {tuple(getattr(outputs, 'shape', ()))}"
        )
    if not isinstance(index, Tensor):
        index = torch.as_tensor(index, dtype=torch.long, device=outputs.device)
    if index.dim() == 1:
        index = index[:, None]
    b, k = index.shape
    if outputs.shape[0] != b * k:
        raise ValueError(f"outputs has {outputs.shape[0]} rows but index selects B*k = {b}*{k} = {b * k} views")
    h, w = outputs.shape[-2:]
    tables = tables or _DeaugTables(space)
    ih, iw = image_size if image_size is not None else (h, w)
    entry = tables.get(int(ih), int(iw), outputs.device)
    if entry is None:
        if outputs.device.type == "cpu":
            back, valid = space.deaugment(outputs, index, mode=interpolation, grouped=True)
            return back, valid.to(outputs.dtype)
        # No affine map for some candidate (user ops): each candidate's inverse on all rows,
        # then a device-side choice per row -- no host synchronisation, T times the work.
        flat = index.reshape(-1)
        back = torch.zeros_like(outputs)
        valid = torch.zeros_like(outputs[:, :1])
        for c, cand in enumerate(space.candidates):
            back_c, valid_c = cand.deaugment(outputs, mode=interpolation)
            pick = (flat == c)[:, None, None, None]
            back = torch.where(pick, back_c.to(back.dtype), back)
            valid = torch.where(pick, valid_c.to(valid.dtype), valid)
        return back, valid
    inverse, moved = entry
    flat = index.reshape(-1)
    work = outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) and outputs.device.type == "cpu" else outputs
    grid_dtype = torch.float32 if work.dtype in (torch.float16, torch.bfloat16) else work.dtype
    if work.device.type == "cpu":
        # On CPU a host-side selection costs nothing: warp only the rows whose view moved pixels
        # (same values as the all-rows path below; photometric and identity rows are copied).
        rows = moved[flat].nonzero().squeeze(1)
        back = work.clone()
        valid = torch.ones_like(work[:, :1])
        if rows.numel():
            back[rows], valid[rows] = _warp_back(work[rows], inverse[flat[rows]].to(grid_dtype), interpolation, fill)
        return back.to(outputs.dtype), valid.to(outputs.dtype)
    back, valid = _warp_back(work, inverse[flat].to(grid_dtype), interpolation, fill)
    rows_moved = moved[flat][:, None, None, None]
    back = torch.where(rows_moved, back, work).to(outputs.dtype)
    valid = torch.where(rows_moved, valid, torch.ones_like(valid)).to(outputs.dtype)
    return back, valid


def _warp_back(outputs: Tensor, inverse: Tensor, interpolation: str, fill: str) -> Tuple[Tensor, Tensor]:
    """``outputs`` ``(N, C, H, W)`` resampled through the inverse affine maps ``(N, 2, 3)`` with
    their validity ``(N, 1, H, W)`` (uncovered pixels zeroed with ``fill="zero"``)."""
    n, _, h, w = outputs.shape
    grid = TF.affine_grid(inverse, [n, 1, h, w], align_corners=False)
    back = TF.grid_sample(outputs, grid.to(outputs.dtype), mode=interpolation, padding_mode="border",
                          align_corners=False)
    # A pixel is covered when its centre falls inside the view (same rule and tolerance as
    # functional.deaugment_dense: exact pixel-centre maps of flips/crops round to 1 + eps).
    valid = (grid.abs() <= 1 + 1e-4).all(-1).unsqueeze(1).to(back.dtype)
    return (back * valid if fill == "zero" else back), valid


def merge_views(
    outputs: Tensor,
    validity: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    fallback: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Validity-weighted mean over views: ``outputs`` ``(B, k, K, h, w)``, ``validity``
    ``(B, k, 1, h, w)`` (default all ones), optional per-view ``weights`` ``(B, k)``.

    Returns ``(merged (B, K, h, w), coverage (B, 1, h, w))`` where coverage is the summed
    validity weight. Where it is 0 the result is ``fallback`` (``(B, K, h, w)``) or 0.
    """
    if outputs.dim() != 5:
        raise ValueError(f"outputs must be (B, k, K, h, w), got shape {tuple(outputs.shape)}")
    v = torch.ones_like(outputs[:, :, :1]) if validity is None else validity.to(outputs.dtype)
    if v.shape != outputs.shape[:2] + (1,) + outputs.shape[3:]:
        raise ValueError(f"validity must have shape {tuple(outputs.shape[:2]) + (1,) + tuple(outputs.shape[3:])}, got {tuple(v.shape)}")
    if weights is not None:
        if weights.shape != outputs.shape[:2]:
            raise ValueError(f"weights must have shape (B, k) = {tuple(outputs.shape[:2])}, got {tuple(weights.shape)}")
        v = v * weights.to(outputs.dtype)[:, :, None, None, None]
    den = v.sum(1)
    num = (v * outputs).sum(1)
    covered = den > 0
    merged = num / torch.where(covered, den, torch.ones_like(den))
    if fallback is not None:
        merged = torch.where(covered, merged, fallback.to(merged.dtype))
    else:
        merged = merged * covered.to(merged.dtype)
    return merged, den


def _uncertainty(views: Tensor, validity: Tensor, merged_probs: Tensor, mode: str) -> Tensor:
    """Per-pixel uncertainty ``(B, 1, h, w)`` across views (softmax over the class dim).

    ``"variance"``: validity-weighted variance of the class probabilities across views,
    summed over classes (0 when all views agree, or when only one view covers the pixel).
    ``"entropy"``: entropy (nats) of the merged class probabilities.
    """
    if mode == "entropy":
        p = merged_probs.clamp_min(1e-12)
        return -(merged_probs * p.log()).sum(1, keepdim=True)
    probs = views.softmax(2)
    den = validity.sum(1).clamp_min(1e-12)
    mean = (validity * probs).sum(1) / den
    var = (validity * (probs - mean[:, None]) ** 2).sum(1) / den
    return var.sum(1, keepdim=True)


# --------------------------------------------------------------------------- losses, metrics


def segmentation_loss(
    logits: Tensor,
    target: Tensor,
    kind: str = "ce",
    ignore_index: int = 255,
    smooth: float = 1.0,
) -> Tensor:
    """Per-image loss ``(N,)`` of logits ``(N, K, H, W)`` against labels ``(N, H, W)``.

    ``"ce"``: mean pixel cross-entropy over the pixels that are not ``ignore_index`` (an image
    with no labelled pixel scores 0). ``"dice"``: ``1 - mean_c dice_c`` over the classes,
    soft Dice on the softmax probabilities, ``(2 |p y| + s) / (|p| + |y| + s)``, ignored pixels
    left out.
    """
    _check_choice(kind, LOSS_KINDS, "kind")
    if not isinstance(logits, Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        raise TypeError(f"logits must be a float (N, K, H, W) tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if not isinstance(target, Tensor) or target.dim() != 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target must be integer labels of shape (N, H, W) = {(logits.shape[0],) + tuple(logits.shape[2:])}, "
            f"got {tuple(getattr(target, 'shape', ()))}"
        )
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class labels, got dtype {target.dtype}")
    target = target.long()
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    if kind == "ce":
        ce = TF.cross_entropy(logits.float(), safe, reduction="none") * keep
        return ce.flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    probs = logits.float().softmax(1) * keep[:, None]
    onehot = TF.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).float() * keep[:, None]
    inter = (probs * onehot).flatten(2).sum(-1)
    total = probs.flatten(2).sum(-1) + onehot.flatten(2).sum(-1)
    dice = (2 * inter + smooth) / (total + smooth)
    return 1 - dice.mean(1)


class ConfusionMatrix:
    """Accumulates a ``K x K`` confusion matrix (rows: truth, columns: prediction) on the
    predictions' device; :meth:`metrics` gives mIoU (over classes present in truth or
    prediction), per-class IoU and pixel accuracy."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix: Optional[Tensor] = None

    def update(self, preds: Tensor, target: Tensor) -> "ConfusionMatrix":
        if preds.shape != target.shape:
            raise ValueError(f"preds and target must have the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}")
        keep = target != self.ignore_index
        k = self.num_classes
        code = target.long() * k + preds.long()
        counts = torch.bincount(code[keep].reshape(-1), minlength=k * k)[: k * k].reshape(k, k)
        self.matrix = counts if self.matrix is None else self.matrix + counts.to(self.matrix.device)
        return self

    def metrics(self) -> Dict[str, Any]:
        k = self.num_classes
        m = (self.matrix if self.matrix is not None else torch.zeros(k, k, dtype=torch.long)).double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": iou.tolist(),
        }


def segmentation_metrics(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of label maps ``preds`` against ``target``."""
    return ConfusionMatrix(num_classes, ignore_index).update(preds, target).metrics()


# --------------------------------------------------------------------------- wrappers


def _split_output(out: Any, key: Optional[str]) -> Tensor:
    if isinstance(out, Mapping):
        if key is None:
            raise ValueError(
                f"the model returned a dict (keys {list(out)}); pass output_mask_key= naming the dense logits"
            )
        if key not in out:
            raise KeyError(f"output_mask_key {key!r} is not among the model's outputs {list(out)}")
        out = out[key]
    elif key is not None:
        raise TypeError(f"output_mask_key={key!r} was given but the model returned {type(out).__name__}, not a dict")
    if not isinstance(out, Tensor) or out.dim() != 4 or not out.is_floating_point():
        raise TypeError(
            f"the model must return dense float logits (N, K, H, W), got "
            f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}"
        )
    return out


class _SegmentationTTABase(nn.Module):
    """Shared machinery: views -> one model call -> de-augment -> validity-weighted merge."""

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        space: Any,
        merge_mode: str = "mean",
        output_mask_key: Optional[str] = None,
        interpolation: str = "bilinear",
        coverage: str = "extrapolate",
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        chunk_size: Optional[int] = None,
        uncertainty: str = "variance",
    ):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        self.model = model
        self.space = _resolve_space(space)
        self.space.check_invertible()
        self.merge_mode = _check_choice(merge_mode, MERGE_MODES, "merge_mode")
        self.output_mask_key = output_mask_key
        self.interpolation = _check_choice(interpolation, INTERPOLATIONS, "interpolation")
        self.coverage = _check_choice(coverage, COVERAGE_MODES, "coverage")
        self.uncertainty_mode = _check_choice(uncertainty, UNCERTAINTY_MODES, "uncertainty")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (the model's input normalisation) or not at all")
        if mean is not None:
            m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
            s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
            if (s <= 0).any():
                raise ValueError(f"std must be positive, got {std!r}")
            self.register_buffer("_mean", m, persistent=False)
            self.register_buffer("_std", s, persistent=False)
        else:
            self._mean = None
            self._std = None
        self._tables = _DeaugTables(self.space)
        self._identity = _identity_index(self.space)

    # -- pixel space <-> model space
    def _to_pixels(self, x: Tensor) -> Tensor:
        if self._mean is None:
            return x
        return x * self._std.to(x) + self._mean.to(x)

    def _from_pixels(self, x: Tensor) -> Tensor:
        if self._mean is None:
            return x
        return (x - self._mean.to(x)) / self._std.to(x)

    def _run_model(self, x: Tensor) -> Tensor:
        if self.chunk_size is None or x.shape[0] <= self.chunk_size:
            return _split_output(self.model(x), self.output_mask_key)
        return torch.cat(
            [_split_output(self.model(x[i : i + self.chunk_size]), self.output_mask_key) for i in range(0, x.shape[0], self.chunk_size)]
        )

    def _check_input(self, images: Any) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise TypeError(
                f"images must be a float tensor (B, C, H, W), got "
                f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
            )
        return images

    def _select(self, pixels: Tensor, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def run(self, images: Tensor, **kwargs: Any) -> Dict[str, Tensor]:
        """All intermediate results: ``output`` ``(B, K, H, W)``, ``index`` ``(B, k)``,
        ``views`` ``(B, k, K, H, W)`` (de-augmented), ``validity`` ``(B, k, 1, H, W)``,
        ``coverage`` ``(B, 1, H, W)`` (summed validity of the selected views) and, with
        ``coverage="identity"``, ``identity`` ``(B, K, H, W)`` (the identity view's output)."""
        images = self._check_input(images)
        pixels = self._to_pixels(images)
        index, weights = self._select(pixels, **kwargs)
        b, k = index.shape
        views = apply_views(self.space, pixels, index)
        add_identity = self.coverage == "identity"
        batch = torch.cat([views, pixels]) if add_identity else views
        out = self._run_model(self._from_pixels(batch))
        if out.shape[0] != batch.shape[0]:
            raise ValueError(f"the model returned {out.shape[0]} rows for {batch.shape[0]} inputs")
        view_out = out[: b * k]
        fill = "border" if self.coverage == "extrapolate" else "zero"
        back, valid = deaugment_views(
            view_out, self.space, index, self.interpolation, fill, self._tables, tuple(pixels.shape[-2:])
        )
        back = back.reshape((b, k) + back.shape[1:])
        valid = valid.reshape((b, k) + valid.shape[1:])
        if add_identity:
            fallback = out[b * k :]
        elif self.coverage == "extrapolate":
            fallback = back.mean(1)
        else:
            fallback = None
        if self.merge_mode == "probs":
            back = back.softmax(2)
            if fallback is not None:
                fallback = fallback.softmax(1)
        if k == 1 and weights is None and self.coverage == "extrapolate":
            # one view: the validity-weighted mean is the view itself, and its uncovered pixels
            # take the fallback, the mean over its one view (the view's border fill) -- skip the merge
            merged, coverage = back[:, 0], valid[:, 0]
        else:
            merged, coverage = merge_views(back, valid, weights, fallback)
        r = {"output": merged, "index": index, "views": back, "validity": valid, "coverage": coverage}
        if add_identity:
            r["identity"] = out[b * k :]
        return r

    def _wrap(self, merged: Tensor) -> Any:
        return {self.output_mask_key: merged} if self.output_mask_key is not None else merged

    def forward(self, images: Tensor, **kwargs: Any) -> Any:
        return self._wrap(self.run(images, **kwargs)["output"])

    def forward_with_uncertainty(self, images: Tensor, **kwargs: Any) -> Tuple[Any, Tensor]:
        """``(output, uncertainty (B, 1, H, W))``; see ``uncertainty`` of the constructor."""
        r = self.run(images, **kwargs)
        views = r["views"]
        if self.merge_mode == "probs":
            probs_views, merged_probs = views, r["output"]
            logits_views = probs_views.clamp_min(1e-12).log()
        else:
            logits_views, merged_probs = views, r["output"].softmax(1)
        unc = _uncertainty(logits_views, r["validity"], merged_probs, self.uncertainty_mode)
        return self._wrap(r["output"]), unc


class SegmentationTTAWrapper(_SegmentationTTABase):
    """Conventional segmentation TTA: every candidate of ``space`` on every image, outputs
    de-augmented and averaged with validity weights (``space``: a TransformSpace, a registered
    name such as ``"d4"``, ``"flips"``, ``"paper12"``, ``"five_crops"``, or a ``ttach.Compose``).

    Unlike ttach's ``SegmentationTTAWrapper`` this handles arbitrary-angle rotations, zooms
    and crops (five-crops on masks), runs all views in one model call, and offers a per-pixel
    uncertainty (:meth:`forward_with_uncertainty`: variance across views, or entropy).
    """

    def __init__(self, model: Callable[[Tensor], Any], space: Any = "d4", **kwargs: Any):
        super().__init__(model, space, **kwargs)

    def _select(self, pixels: Tensor, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        b = pixels.shape[0]
        return torch.arange(len(self.space), device=pixels.device).expand(b, -1), None


def _check_k(k: Any, space: TransformSpace) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(space):
        raise ValueError(f"k must be an int in [1, {len(space)}] (the space's size), got {k!r}")
    return k


class LossGuidedSegmentationWrapper(_SegmentationTTABase):
    """Loss-guided TTA for segmentation: the ``predictor`` scores every candidate of its space
    for each image (lower = better), the ``k`` best are applied, the ``B * k`` views go through
    the model in one call, and the de-augmented outputs are merged with validity weights.

    ``predictor(pixels)`` takes images in [0, 1] and returns ``(B, len(space))``; ``space``
    defaults to ``predictor.space`` and, if both are given, must match it. ``mean``/``std``:
    the model's input normalisation (inputs are normalised; the predictor gets pixels).
    ``coverage``, ``interpolation``: see the module docstring.
    """

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        predictor: Callable[[Tensor], Tensor],
        space: Any = None,
        k: int = 1,
        **kwargs: Any,
    ):
        if not callable(predictor):
            raise TypeError(f"predictor must be callable (a LossPredictor), got {type(predictor).__name__}")
        pspace = getattr(predictor, "space", None)
        if space is None:
            if pspace is None:
                raise ValueError("space is required when the predictor has no .space attribute")
            space = pspace
        super().__init__(model, space, **kwargs)
        if isinstance(pspace, TransformSpace) and pspace.fingerprint != self.space.fingerprint:
            raise ValueError(
                f"space {self.space.name!r} (fingerprint {self.space.fingerprint}) differs from the space the "
                f"predictor was trained for: {pspace.name!r} (fingerprint {pspace.fingerprint})"
            )
        self.predictor = predictor
        self.k = _check_k(k, self.space)

    def _select(self, pixels: Tensor, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        scores = self.predictor(pixels)
        if not isinstance(scores, Tensor) or scores.shape != (pixels.shape[0], len(self.space)):
            raise ValueError(
                f"the predictor must return (B, {len(self.space)}) scores, got {tuple(getattr(scores, 'shape', ()))}"
            )
        return torch.topk(scores, self.k, dim=1, largest=False, sorted=True).indices, None


class RandomKSegmentationWrapper(_SegmentationTTABase):
    """Baseline: ``k`` distinct candidates drawn uniformly at random for each image."""

    def __init__(self, model: Callable[[Tensor], Any], space: Any, k: int = 1, generator: Optional[torch.Generator] = None, **kwargs: Any):
        super().__init__(model, space, **kwargs)
        self.k = _check_k(k, self.space)
        self.generator = generator

    def _select(self, pixels: Tensor, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        gen_device = self.generator.device if self.generator is not None else pixels.device
        noise = torch.rand(pixels.shape[0], len(self.space), generator=self.generator, device=gen_device)
        return noise.argsort(1)[:, : self.k].to(pixels.device), None


class OracleKSegmentationWrapper(_SegmentationTTABase):
    """Upper bound: the ``k`` candidates with the lowest true per-image loss, which needs the
    labels: ``forward(images, target=labels)``. Costs ``len(space) + k`` forwards."""

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        space: Any,
        k: int = 1,
        loss: str = "ce",
        ignore_index: int = 255,
        **kwargs: Any,
    ):
        super().__init__(model, space, **kwargs)
        self.k = _check_k(k, self.space)
        self.loss = _check_choice(loss, LOSS_KINDS, "loss")
        self.ignore_index = ignore_index

    def _select(self, pixels: Tensor, target: Optional[Tensor] = None, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if target is None:
            raise ValueError("OracleKSegmentationWrapper needs the labels: call it as wrapper(images, target=labels)")
        losses = view_losses(
            self.model, self.space, pixels, target, loss=self.loss, ignore_index=self.ignore_index,
            interpolation=self.interpolation, coverage=self.coverage, output_mask_key=self.output_mask_key,
            from_pixels=self._from_pixels, chunk_size=self.chunk_size,
        )
        return torch.topk(losses, self.k, dim=1, largest=False, sorted=True).indices, None


# --------------------------------------------------------------------------- labels


@torch.no_grad()
def view_losses(
    model: Callable[[Tensor], Any],
    space: Any,
    pixels: Tensor,
    target: Tensor,
    loss: str = "ce",
    ignore_index: int = 255,
    interpolation: str = "bilinear",
    coverage: str = "extrapolate",
    output_mask_key: Optional[str] = None,
    from_pixels: Optional[Callable[[Tensor], Tensor]] = None,
    chunk_size: Optional[int] = None,
    return_accuracy: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-image loss of every candidate ``(B, len(space))``: each candidate's view through the
    model, de-augmented, uncovered pixels filled as the ``k = 1`` wrapper with this
    ``coverage`` would, scored against ``target`` ``(B, H, W)`` -- i.e. exactly the loss the
    loss-guided wrapper would incur choosing that candidate alone. These are the labels the
    predictor learns to rank.

    ``return_accuracy=True``: ``(losses, accuracy)``, ``accuracy`` ``(B, len(space))`` the pixel
    accuracy of each candidate's k=1 prediction (fraction of the pixels that are not
    ``ignore_index`` whose argmax is the target; 0 for an image without such pixels) -- the
    per-view "correct" of a segmentation label cache (what
    :func:`ttach_instance.training.trainer.calibrate_identity_margin` maximises)."""
    space = _resolve_space(space)
    wrapper = SegmentationTTAWrapper(model, space, interpolation=interpolation, coverage=coverage,
                        output_mask_key=output_mask_key, chunk_size=chunk_size)
    if from_pixels is not None:
        wrapper._from_pixels = from_pixels  # type: ignore[method-assign]
    r = wrapper.run(pixels)
    views, valid = r["views"], r["validity"]  # (B, T, K, H, W), (B, T, 1, H, W)
    b, t = views.shape[:2]
    if coverage == "identity":
        ident = r["identity"][:, None].expand_as(views)
        views = torch.where(valid > 0, views, ident)
    elif coverage == "zero":
        views = views * valid
    flat = views.reshape((b * t,) + views.shape[2:])
    tgt = target.to(flat.device).repeat_interleave(t, 0)
    losses = segmentation_loss(flat, tgt, kind=loss, ignore_index=ignore_index).reshape(b, t)
    if not return_accuracy:
        return losses
    keep = tgt != ignore_index
    hits = ((flat.argmax(1) == tgt) & keep).flatten(1).sum(1)
    accuracy = (hits.float() / keep.flatten(1).sum(1).clamp_min(1).float()).reshape(b, t)
    return losses, accuracy


class SegmentationTask:
    """Per-view loss for label generation on segmentation models.

    ``task.view_losses(model, space, pixels, target)`` -> ``(B, len(space))`` relative
    per-image losses (see :func:`view_losses`); ``task.loss(logits, target)`` -> ``(N,)``.
    Defaults: mean pixel cross-entropy with ``ignore_index=255``; ``loss="dice"`` for Dice.
    """

    name = "segmentation"

    def __init__(
        self,
        loss: str = "ce",
        ignore_index: int = 255,
        interpolation: str = "bilinear",
        coverage: str = "extrapolate",
        output_mask_key: Optional[str] = None,
    ):
        self.loss_kind = _check_choice(loss, LOSS_KINDS, "loss")
        self.ignore_index = ignore_index
        self.interpolation = _check_choice(interpolation, INTERPOLATIONS, "interpolation")
        self.coverage = _check_choice(coverage, COVERAGE_MODES, "coverage")
        self.output_mask_key = output_mask_key

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return segmentation_loss(logits, target, kind=self.loss_kind, ignore_index=self.ignore_index)

    def view_losses(self, model: Callable[[Tensor], Any], space: Any, pixels: Tensor, target: Tensor,
                    from_pixels: Optional[Callable[[Tensor], Tensor]] = None, chunk_size: Optional[int] = None,
                    return_accuracy: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        return view_losses(
            model, space, pixels, target, loss=self.loss_kind, ignore_index=self.ignore_index,
            interpolation=self.interpolation, coverage=self.coverage, output_mask_key=self.output_mask_key,
            from_pixels=from_pixels, chunk_size=chunk_size, return_accuracy=return_accuracy,
        )
