"""ttach interop: ttach-compatible transforms over our ops, and conversion between ttach
pipelines and spaces (:func:`to_ttach`, :func:`from_ttach`).

Each class is a ``ttach`` ``DualTransform`` (geometric) or ``ImageOnlyTransform``
(photometric) usable in ``ttach.Compose`` and ttach's wrappers. Like ttach's own transforms,
the identity parameter is always included. Unlike ttach's ``FiveCrops``, our crops resize the
crop back to the input size and de-augment masks (pixels outside the crop come back as 0).

Images must be in pixel range [0, 1] (the ops reproduce PIL's 8-bit pipeline and clip to
[0, 1]); with ttach's wrappers, wrap a model that normalises its input itself.

The dependency points one way (interop -> space): this module defines the conversions and
attaches them to :class:`TransformSpace` as ``space.to_ttach()`` and
``TransformSpace.from_ttach(compose)``; ``import ttach_instance`` imports this module.

Keypoint de-augmentation needs the image size for aspect-dependent maps (rotations, crops);
the transform remembers the size of the last image it augmented, as ttach's wrappers always
augment before they de-augment.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import ttach
from ttach.base import DualTransform, ImageOnlyTransform

from . import ops as O
from .space import Candidate, TransformSpace


class _OpChoice:
    """Shared behaviour: the parameter is an op (``None`` = identity)."""

    pname = "op"
    identity_param = None
    _size: Optional[Tuple[int, int]] = None

    def apply_aug_image(self, image, op=None, **kwargs):
        self._size = tuple(image.shape[-2:])
        return image if op is None else op.apply(image)

    def apply_deaug_mask(self, mask, op=None, **kwargs):
        return mask if op is None else op.deaugment_dense(mask)[0]

    def apply_deaug_label(self, label, op=None, **kwargs):
        return label

    def apply_deaug_keypoints(self, keypoints, op=None, **kwargs):
        if op is None or not op.geometric:
            return keypoints
        h, w = self._size or (1, 1)
        return op.deaugment_keypoints(keypoints, h, w)


class OpTransform(_OpChoice, DualTransform):
    """Any list of ops as one ttach transform (parameters: identity, then each op)."""

    def __init__(self, ops: Sequence[O.Op]):
        DualTransform.__init__(self, "op", [None] + list(ops))


class _PhotometricOpTransform(_OpChoice, ImageOnlyTransform):
    def __init__(self, ops: Sequence[O.Op]):
        ImageOnlyTransform.__init__(self, "op", [None] + list(ops))


class Rotate(OpTransform):
    """Rotations by each angle (degrees, counter-clockwise) with mirrored corners."""

    def __init__(self, angles: Sequence[float]):
        super().__init__([O.Rotate(a) for a in angles if a != 0])


class Zoom(OpTransform):
    """Zooms about the centre (> 1 zooms in) with mirrored borders."""

    def __init__(self, scales: Sequence[float]):
        super().__init__([O.Zoom(s) for s in scales if s != 1])


class FiveCropsResized(OpTransform):
    """ttach's five crops, each resized back to the input size; masks de-augment."""

    def __init__(self, crop_height: int, crop_width: int):
        DualTransform.__init__(self, "op", [O.CropResize(p, (crop_height, crop_width)) for p in O.CROP_POSITIONS])


class AutoContrast(_PhotometricOpTransform):
    def __init__(self) -> None:
        super().__init__([O.AutoContrast()])


class Sharpness(_PhotometricOpTransform):
    def __init__(self, factors: Sequence[float]):
        super().__init__([O.Sharpness(f) for f in factors if f != 1])


class Color(_PhotometricOpTransform):
    def __init__(self, factors: Sequence[float]):
        super().__init__([O.Color(f) for f in factors if f != 1])


class SpaceTransform(DualTransform):
    """A whole space as one ttach transform: the parameter is the candidate index."""

    identity_param = 0

    def __init__(self, space: TransformSpace):
        self.space = space
        self._size: Optional[Tuple[int, int]] = None
        super().__init__("candidate", list(range(len(space))))

    def apply_aug_image(self, image, candidate=0, **kwargs):
        self._size = tuple(image.shape[-2:])
        return self.space[candidate].apply(image)

    def apply_deaug_mask(self, mask, candidate=0, **kwargs):
        return self.space[candidate].deaugment(mask)[0]

    def apply_deaug_label(self, label, candidate=0, **kwargs):
        return label

    def apply_deaug_keypoints(self, keypoints, candidate=0, **kwargs):
        h, w = self._size or (1, 1)
        return self.space[candidate].deaugment_keypoints(keypoints, h, w)


def _ops_of(transform: Any, param: Any) -> List[O.Op]:
    """Our ops equivalent to one ttach transform at one parameter value."""
    import ttach.transforms as tt

    if isinstance(transform, _OpChoice):
        return [] if param is None else [param]
    if isinstance(transform, SpaceTransform):
        return list(transform.space[param].ops)
    if param == getattr(transform, "identity_param", object()):
        return []
    if isinstance(transform, tt.HorizontalFlip):
        return [O.HFlip()] if param else []
    if isinstance(transform, tt.VerticalFlip):
        return [O.VFlip()] if param else []
    if isinstance(transform, tt.Rotate90):
        return [O.Rot90(int(param) // 90)]
    if isinstance(transform, tt.FiveCrops):
        # ttach returns the bare crop; as a candidate it is resized back to the input size so
        # all views batch together (and masks can be de-augmented).
        name = getattr(param, "func", None)
        kw = getattr(param, "keywords", {})
        position = {
            "crop_lt": "left_top",
            "crop_lb": "left_bottom",
            "crop_rb": "right_bottom",
            "crop_rt": "right_top",
            "center_crop": "center",
        }[name.__name__]
        return [O.CropResize(position, (kw["crop_h"], kw["crop_w"]))]
    # Anything else (Add, Multiply, Scale, Resize, user transforms): keep ttach's own code.
    geometric = isinstance(transform, DualTransform)
    pname = transform.pname
    return [
        O.CallableOp(
            f"{type(transform).__name__}({pname}={param})",
            lambda x, t=transform, p=param: t.apply_aug_image(x, **{pname: p}),
            geometric=geometric,
            deaugment_dense=(lambda m, t=transform, p=param: t.apply_deaug_mask(m, **{pname: p})) if geometric else None,
            deaugment_keypoints=(lambda k, t=transform, p=param: t.apply_deaug_keypoints(k, **{pname: p}))
            if geometric
            else None,
        )
    ]


def candidates_from_ttach(compose: "ttach.Compose") -> List[Candidate]:
    if not isinstance(compose, ttach.Compose):
        raise TypeError(f"expected a ttach.Compose, got {type(compose).__name__}")
    cands = []
    for params in compose.aug_transform_parameters:
        ops: List[O.Op] = []
        for t, p in zip(compose.aug_transforms, params):
            ops.extend(_ops_of(t, p))
        cands.append(Candidate(ops))
    return cands


def to_ttach(space: TransformSpace) -> "ttach.Compose":
    """``space`` as a ``ttach.Compose`` (one transform whose parameter is the candidate)."""
    return ttach.Compose([SpaceTransform(space)])


def from_ttach(compose: "ttach.Compose", name: str = "ttach") -> TransformSpace:
    """Convert a ``ttach.Compose``: one candidate per parameter combination, in ttach's order."""
    return _from_ttach(TransformSpace, compose, name)


def _from_ttach(cls, compose: "ttach.Compose", name: str = "ttach") -> TransformSpace:
    return cls(candidates_from_ttach(compose), name=name)


TransformSpace.to_ttach = to_ttach
TransformSpace.from_ttach = classmethod(_from_ttach)
