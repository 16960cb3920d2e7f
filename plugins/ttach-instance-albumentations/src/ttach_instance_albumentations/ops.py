"""albumentations transforms as ttach-instance ops and spaces (a CPU path).

Every call converts the batch: float ``[0, 1]`` tensor (any device) -> ``uint8`` HWC numpy on
the CPU, one image at a time through albumentations (OpenCV), then back to a tensor of the
input's dtype on the input's device. The ``uint8`` round trip quantises to 1/255; the cost is
measured in the package README.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Union

import albumentations as A
import numpy as np
import torch
from torch import Tensor

from ttach_instance.ops import Op
from ttach_instance.space import Candidate, TransformSpace

__all__ = [
    "AlbumentationsOp",
    "DEFAULT_TRANSFORMS",
    "albumentations_space",
    "default_transforms",
    "space_from_albumentations",
    "to_uint8_hwc",
    "from_uint8_hwc",
]


def default_transforms() -> Dict[str, A.BasicTransform]:
    """The default test-time set: deterministic (``p=1``, every range collapsed to one value)."""
    return {
        "clahe": A.CLAHE(clip_limit=(2.0, 2.0), tile_grid_size=(8, 8), p=1.0),
        "equalize": A.Equalize(mode="cv", by_channels=True, p=1.0),
        "unsharp_mask": A.UnsharpMask(blur_limit=(5, 5), sigma_limit=(1.0, 1.0), alpha=(0.5, 0.5), threshold=10, p=1.0),
        "sharpen": A.Sharpen(alpha=(0.3, 0.3), lightness=(1.0, 1.0), p=1.0),
        "gaussian_blur": A.GaussianBlur(blur_limit=(5, 5), sigma_limit=(1.0, 1.0), p=1.0),
        "median_blur": A.MedianBlur(blur_limit=(3, 3), p=1.0),
        "gamma_0.8": A.RandomGamma(gamma_limit=(80, 80), p=1.0),
        "gamma_1.25": A.RandomGamma(gamma_limit=(125, 125), p=1.0),
    }


#: Candidate names of the ``albumentations`` space after ``identity``, in order.
DEFAULT_TRANSFORMS = tuple(default_transforms())


# --------------------------------------------------------------------------- conversion


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """``(B, C, H, W)`` float in ``[0, 1]`` (or uint8) -> ``(B, H, W, C)`` uint8 numpy on the CPU.
    Values are clamped to ``[0, 1]`` and rounded to the nearest 1/255."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    x = images.detach().permute(0, 2, 3, 1)
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1] or uint8, got {x.dtype}")
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        # Quantise on the tensor's own device (round, then clamp: the same as clamping to
        # [0, 1] first); only uint8 crosses to the host.
        x = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8, memory_format=torch.contiguous_format)
    return x.contiguous().cpu().numpy()


def from_uint8_hwc(arrays: np.ndarray, like: Tensor) -> Tensor:
    """``(B, H, W, C)`` uint8 -> ``(B, C, H, W)`` with ``like``'s dtype and device (floats in [0, 1])."""
    t = torch.from_numpy(np.ascontiguousarray(arrays)).to(like.device).permute(0, 3, 1, 2).contiguous()
    if like.dtype == torch.uint8:
        return t
    work = torch.float64 if like.dtype == torch.float64 else torch.float32
    return t.to(work).div_(255.0).to(like.dtype)


# --------------------------------------------------------------------------- op


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])|(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and value[0] == value[1]:
            return _short(value[0])
        return "x".join(_short(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return str(value)


def _serialize(transform: A.BasicTransform) -> Dict[str, Any]:
    try:
        return dict(transform.to_dict()["transform"])  # without "__version__": stable fingerprints
    except Exception:  # e.g. A.Lambda: not serialisable, described by its repr
        return {"__class_fullname__": type(transform).__name__, "repr": repr(transform)}


def _default_name(serialized: Dict[str, Any]) -> str:
    cls = str(serialized.get("__class_fullname__", "albu")).rsplit(".", 1)[-1]
    args = [f"{k}={_short(v)}" for k, v in serialized.items() if k not in ("__class_fullname__", "p", "repr")]
    return f"{_snake(cls)}({', '.join(args)})" if args else _snake(cls)


_PROBE = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def _check_deterministic(transform: A.BasicTransform, name: str) -> None:
    outputs = []
    for seed in (1, 2, 3):
        transform.set_random_seed(seed)
        try:
            outputs.append(transform(image=_PROBE.copy())["image"])
        except Exception as exc:
            raise ValueError(
                f"albumentations op {name}: failed on a 32x32 RGB uint8 probe image ({type(exc).__name__}: {exc}); "
                f"pass check_deterministic=False if it needs other inputs"
            ) from exc
    if any(o.shape != outputs[0].shape or not np.array_equal(o, outputs[0]) for o in outputs[1:]):
        raise ValueError(
            f"albumentations op {name}: gives different results under different random seeds; test-time ops "
            f"must be deterministic: collapse every range to one value, e.g. sigma_limit=(1.0, 1.0)"
        )


class AlbumentationsOp(Op):
    """One albumentations transform as an op (family ``albu``).

    ``transform``: an albumentations transform with ``p=1`` and fixed parameters, or its
    serialised form (``transform.to_dict()["transform"]``, which is what :meth:`spec`
    stores, so ``make_op("albu", **op.spec())`` minus ``"op"`` rebuilds it). ``name`` enters
    candidate names and the space fingerprint (default: class and parameters).

    Pixel-level transforms are photometric. Spatial ones (``A.DualTransform``, e.g.
    ``HorizontalFlip``) are marked geometric *without* an inverse: classification can use
    them, segmentation refuses them (``TransformSpace.check_invertible``). Output must keep
    the input's shape.
    """

    family = "albu"

    def __init__(
        self,
        transform: Union[A.BasicTransform, Dict[str, Any]],
        name: Optional[str] = None,
        check_deterministic: bool = True,
    ):
        if isinstance(transform, dict):
            data = transform.get("transform", transform)
            if "repr" in data:
                raise ValueError(f"transform: {data['repr']} was not serialisable and cannot be rebuilt from its spec")
            try:
                transform = A.from_dict({"transform": dict(data)})
            except Exception as exc:
                raise ValueError(f"transform: cannot rebuild an albumentations transform from {data!r}: {exc}") from exc
        if not isinstance(transform, A.BasicTransform):
            raise TypeError(
                f"transform must be an albumentations transform (e.g. A.CLAHE(clip_limit=(2, 2), p=1)) or its "
                f"to_dict() form, got {type(transform).__name__}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        serialized = _serialize(transform)
        name = name or _default_name(serialized)
        if float(getattr(transform, "p", 1.0)) != 1.0:
            raise ValueError(
                f"albumentations op {name}: p={transform.p}; test-time ops must always apply, use p=1.0"
            )
        if check_deterministic:
            _check_deterministic(transform, name)
        super().__init__(transform=serialized, name=name)
        self.transform = transform
        self._geometric = isinstance(transform, A.DualTransform)

    @property
    def name(self) -> str:
        return self._params["name"]

    @property
    def geometric(self) -> bool:  # type: ignore[override]
        return self._geometric

    def apply(self, images: Tensor) -> Tensor:
        arrays = to_uint8_hwc(images)
        out = np.empty_like(arrays)
        for i, image in enumerate(arrays):
            result = self.transform(image=image)["image"]
            if result.ndim == 2 and image.ndim == 3 and image.shape[-1] == 1:
                result = result[..., None]
            if result.shape != image.shape:
                raise ValueError(
                    f"albumentations op {self.name} changed the image shape from {image.shape} to {result.shape} "
                    f"(H, W, C); ops must keep the input's shape"
                )
            out[i] = np.clip(result, 0, 255) if result.dtype != np.uint8 else result
        return from_uint8_hwc(out, images)


# --------------------------------------------------------------------------- spaces

Item = Union[A.BasicTransform, Op, Sequence[Union[A.BasicTransform, Op]]]


def _as_op(item: Any, name: Optional[str], where: str) -> Op:
    if isinstance(item, Op):
        return item
    if isinstance(item, A.BasicTransform):
        return AlbumentationsOp(item, name=name)
    raise TypeError(f"{where}: expected an albumentations transform or a ttach-instance Op, got {type(item).__name__}")


def space_from_albumentations(
    transforms: Sequence[Item],
    name: str = "albumentations_custom",
    names: Optional[Sequence[str]] = None,
    include_identity: bool = True,
) -> TransformSpace:
    """A space from your own albumentations transforms.

    Each item is one candidate: an albumentations transform (``p=1``, fixed parameters), a
    ttach-instance :class:`~ttach_instance.ops.Op`, or a list of them applied in order.
    ``names`` (one per item) name the candidates; ``include_identity`` puts ``identity`` first
    (the paper's spaces and the predictors expect it).

    >>> space_from_albumentations([A.CLAHE(clip_limit=(2, 2), p=1), A.Equalize(p=1)], names=["clahe", "eq"])
    """
    if isinstance(transforms, (A.BasicTransform, Op)) or not isinstance(transforms, Sequence):
        raise TypeError(f"transforms must be a list of albumentations transforms, got {type(transforms).__name__}")
    if names is not None:
        if isinstance(names, str) or len(names) != len(transforms):
            raise ValueError(f"names must be a list with one name per transform ({len(transforms)}), got {names!r}")
    cands: List[Candidate] = [Candidate()] if include_identity else []
    for i, item in enumerate(transforms):
        cand_name = names[i] if names is not None else None
        if isinstance(item, (list, tuple)):
            ops = [_as_op(t, None, f"transforms[{i}][{j}]") for j, t in enumerate(item)]
            cands.append(Candidate(ops, name=cand_name))
        else:
            cands.append(Candidate(_as_op(item, cand_name, f"transforms[{i}]"), name=cand_name))
    return TransformSpace(cands, name=name)


def albumentations_space(names: Optional[Sequence[str]] = None) -> TransformSpace:
    """``identity`` and the default deterministic set (:data:`DEFAULT_TRANSFORMS`), or the
    subset ``names`` of it, in the default order."""
    table = default_transforms()
    if names is None:
        chosen = list(table)
    else:
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ValueError(f"names: unknown default transform(s) {unknown}; choose from {list(table)}")
        chosen = [n for n in table if n in set(names)]
    return space_from_albumentations([table[n] for n in chosen], name="albumentations", names=chosen)
