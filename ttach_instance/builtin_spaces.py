"""Built-in transform spaces and ops, registered through the same hooks as any plugin (the core
distribution's own `builtin` entry point, pyproject.toml)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from .hookspecs import hookimpl
from .ops import (
    BUILTIN_OPS,
    CROP_POSITIONS,
    AutoContrast,
    Brightness,
    Color,
    Contrast,
    CropResize,
    HFlip,
    Identity,
    ResizeCrop,
    Rot90,
    Rotate,
    Sharpness,
    TranslateX,
    TranslateY,
    VFlip,
    Zoom,
)
from .policy import policy_space
from .pools import randaugment
from .space import Candidate, TransformSpace

CropSize = Union[int, float, Sequence[Union[int, float]]]


def paper12() -> TransformSpace:
    """The 12 candidates of "Learning Loss for Test-Time Augmentation", in the paper's order."""
    ops = [
        Identity(),
        Rotate(-20),
        Rotate(20),
        Zoom(0.8),
        Zoom(1.2),
        AutoContrast(),
        Sharpness(0.2),
        Sharpness(0.5),
        Sharpness(3.0),
        Sharpness(4.0),
        Color(0.5),
        Color(2.0),
    ]
    return TransformSpace([Candidate(op) for op in ops], name="paper12")


def identity() -> TransformSpace:
    return TransformSpace([Candidate()], name="identity")


def hflip() -> TransformSpace:
    return TransformSpace([Candidate(), Candidate(HFlip())], name="hflip")


def flips() -> TransformSpace:
    return TransformSpace(
        [Candidate(), Candidate(HFlip()), Candidate(VFlip()), Candidate([HFlip(), VFlip()])], name="flips"
    )


def d4() -> TransformSpace:
    """The dihedral group in ttach's ``d4_transform`` order: flip (no, yes) x quarter turns."""
    cands = []
    for flip in (False, True):
        for k in range(4):
            ops = ([HFlip()] if flip else []) + ([Rot90(k)] if k else [])
            cands.append(Candidate(ops))
    return TransformSpace(cands, name="d4")


def five_crops(crop_size: CropSize = 0.875) -> TransformSpace:
    """ttach's five crops (left-top, left-bottom, right-bottom, right-top, centre), each resized
    back to the input size. ``crop_size``: pixels (int) or a fraction of the image (float)."""
    return TransformSpace([Candidate(CropResize(p, crop_size)) for p in CROP_POSITIONS], name="five_crops")


def ten_crops(crop_size: CropSize = 0.875) -> TransformSpace:
    """Five crops, then the same five crops horizontally flipped."""
    crops = five_crops(crop_size)
    flipped = [Candidate(c.ops + (HFlip(),)) for c in crops]
    return TransformSpace(list(crops) + flipped, name="ten_crops")


def center_crop_paper(fraction: float = 0.875) -> TransformSpace:
    """The paper's Center-Crop baseline: resize up by ``1 / fraction``, cut the centre window of
    the input's size (no resize back; :class:`~ttach_instance.ops.ResizeCrop`)."""
    return TransformSpace([Candidate(ResizeCrop("center", fraction))], name="center_crop_paper")


def five_crops_paper(fraction: float = 0.875) -> TransformSpace:
    """The paper's 5-Crops: the four corner windows and the centre one of the input's size, cut
    from the image resized up by ``1 / fraction`` (torchvision's ``Resize`` + ``FiveCrop``), in
    :data:`~ttach_instance.ops.CROP_POSITIONS` order."""
    return TransformSpace([Candidate(ResizeCrop(p, fraction)) for p in CROP_POSITIONS], name="five_crops_paper")


def ten_crops_paper(fraction: float = 0.875) -> TransformSpace:
    """The paper's 10-Crops: :func:`five_crops_paper` and the horizontal flip of each window."""
    crops = five_crops_paper(fraction)
    return TransformSpace(list(crops) + [Candidate(c.ops + (HFlip(),)) for c in crops], name="ten_crops_paper")


def sweep() -> TransformSpace:
    """A magnitude sweep of single ops for the staged budget search (Dufour, "How to correctly use
    test-time augmentation"): the identity, the horizontal flip, shifts, zooms, rotations and
    colour factors, each family at a few magnitudes on both sides of the identity; stage (a)
    keeps each family's best, stage (c) composes winners (flip + shift)."""
    shifts = (0.03, 0.06, 0.09, 0.125)
    ops = [Identity(), HFlip()]
    ops += [TranslateX(s * sign) for s in shifts for sign in (-1, 1)]
    ops += [TranslateY(s * sign) for s in shifts for sign in (-1, 1)]
    ops += [Zoom(z) for z in (0.8, 0.875, 0.9, 1.1, 1.2)]
    ops += [Rotate(a * sign) for a in (5, 10, 15, 20) for sign in (-1, 1)]
    for family in (Brightness, Contrast, Color):
        ops += [family(f) for f in (0.7, 0.85, 1.15, 1.3)]
    ops += [Sharpness(f) for f in (0.5, 2.0, 3.0)]
    return TransformSpace([Candidate(op) for op in ops], name="sweep")


def paper12_hflip() -> TransformSpace:
    """paper12 x {identity, hflip}: 24 candidates (the paper's flip-combined variant)."""
    return paper12().product(hflip(), name="paper12_hflip")


BUILTIN_SPACES = {
    "paper12": (paper12, "the paper's 12 ops: identity, rotate +-20, zoom 0.8/1.2, autocontrast, sharpness x4, color x2"),
    "identity": (identity, "the input alone"),
    "hflip": (hflip, "identity and horizontal flip"),
    "flips": (flips, "identity, hflip, vflip, both"),
    "d4": (d4, "the 8 flips and quarter turns (square images)"),
    "five_crops": (five_crops, "4 corner crops + centre crop, resized back (crop_size: px or fraction)"),
    "ten_crops": (ten_crops, "five crops and their horizontal flips"),
    "sweep": (sweep, "single ops at a few magnitudes (flip, shifts, zooms, rotations, colour factors): the staged "
                     "budget search's pool"),
    "paper12_hflip": (paper12_hflip, "paper12 combined with horizontal flip (24)"),
    "center_crop_paper": (center_crop_paper, "the paper's Center-Crop: resize by 1/fraction (0.875), centre window "
                                             "of the input size, no resize back"),
    "five_crops_paper": (five_crops_paper, "the paper's 5-Crops: resize by 1/fraction, 4 corner + centre windows of the "
                                           "input size"),
    "ten_crops_paper": (ten_crops_paper, "the paper's 10-Crops: five_crops_paper and their horizontal flips"),
    "randaugment": (randaugment, "GPS's RandAugment pool: identity + 100 two-op sub-policies (size: 32 = GPS's CIFAR "
                                 "pool, 64/224 = its ImageNet pool; default 224)"),
}

def policy(path: str, n: Optional[int] = None) -> TransformSpace:
    """The first ``n`` (default all) candidates of the policy file at ``path``, written by
    ``ttach-instance search``, in the order chosen; a candidate GPS chose again is kept as
    ``"name#k"`` (:func:`ttach_instance.policy.policy_space`)."""
    return policy_space(path, n)


#: Built-in spaces that need parameters (left out of BUILTIN_SPACES, whose factories all have defaults).
PARAMETRIC_SPACES = {
    "policy": (policy, "a policy file's candidates in order (path=FILE.json, n=first n; GPS repeats kept as name#k); "
                       "also reached as --space FILE.json[:n=N]"),
}

OP_DESCRIPTIONS = {
    "identity": "no change",
    "rotate": "rotate(angle): degrees counter-clockwise, bicubic, mirrored corners",
    "zoom": "zoom(scale): about the centre, >1 zooms in, antialiased bicubic, mirrored borders",
    "autocontrast": "per-channel histogram stretch (PIL ImageOps.autocontrast)",
    "sharpness": "sharpness(factor): PIL ImageEnhance.Sharpness",
    "color": "color(factor): PIL ImageEnhance.Color",
    "hflip": "horizontal flip",
    "vflip": "vertical flip",
    "rot90": "rot90(k): k quarter turns counter-clockwise",
    "crop": "crop(position, size): a five-crop position resized back to the input size",
    "resize_crop": "resize_crop(position, fraction): resize by 1/fraction, a window of the input size (no resize back)",
    "translate_x": "translate_x(fraction): content moves right by fraction of the width, bicubic, mirrored fill",
    "translate_y": "translate_y(fraction): content moves down by fraction of the height, bicubic, mirrored fill",
    "shear_x": "shear_x(shear): (X, Y) reads (X + shear*Y, Y) about the centre, bicubic, mirrored fill",
    "shear_y": "shear_y(shear): (X, Y) reads (X, Y + shear*X) about the centre, bicubic, mirrored fill",
    "brightness": "brightness(factor): PIL ImageEnhance.Brightness",
    "contrast": "contrast(factor): PIL ImageEnhance.Contrast (blend with the rounded mean grey)",
    "equalize": "per-channel histogram equalisation (PIL ImageOps.equalize)",
    "posterize": "posterize(bits): keep the bits (1-8) high bits of each 8-bit level (PIL ImageOps.posterize)",
    "solarize": "solarize(threshold): invert pixels >= threshold in [0, 1] (PIL ImageOps.solarize, threshold*255)",
}


@hookimpl
def register_spaces(register):
    for name, (factory, description) in {**BUILTIN_SPACES, **PARAMETRIC_SPACES}.items():
        register(name, factory, description)


@hookimpl
def register_ops(register):
    for name, cls in BUILTIN_OPS.items():
        register(name, cls, OP_DESCRIPTIONS.get(name, ""))
