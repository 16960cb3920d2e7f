"""Ops: the named, parameterised building blocks that candidates of a space are made of.

An op is a thin, immutable description over a :mod:`ttach_instance.functional` kernel. It
knows its name (``rotate(-20)``), whether it moves pixels (``geometric``), how to apply itself
to a batch, and, for geometric ops, its view->input map ``theta`` so dense outputs and
keypoints can be brought back to the input frame.

Built-in ops also expose a *row-parameter* form (``row_params`` / ``apply_rows``): one family
kernel applied to a batch where every row has its own parameters. A space made of such ops
can transform a batch that mixes candidates without grouping by candidate, i.e. without any
data-dependent shape and so without synchronising with an accelerator's host.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import functional as F


class Op:
    """Base class. Subclasses set ``family`` and implement :meth:`apply`."""

    family: ClassVar[str] = "op"
    #: Moves pixels: outputs of a geometric view must be de-augmented.
    geometric: ClassVar[bool] = False
    #: Row-parameter form is available (``row_params`` / ``apply_rows``).
    supports_rows: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self._params = dict(params)

    # -- identity
    @property
    def params(self) -> Dict[str, Any]:
        return dict(self._params)

    @property
    def name(self) -> str:
        if not self._params:
            return self.family
        values = ", ".join(_format(v) for v in self._params.values())
        return f"{self.family}({values})"

    def spec(self) -> Dict[str, Any]:
        """JSON-able description used for fingerprints and metadata."""
        return {"op": self.family, **{k: _jsonable(v) for k, v in self._params.items()}}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.spec() == self.spec()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self.spec())))

    # -- behaviour
    def apply(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def theta(self, height: int, width: int, device: Union[str, torch.device] = "cpu") -> Optional[Tensor]:
        """View->input map ``(2, 3)`` (float64) for geometric ops; ``None`` when the op does
        not move pixels or cannot describe its motion as an affine map."""
        return None

    @property
    def invertible(self) -> bool:
        """Dense outputs of this op's views can be brought back to the input frame."""
        # Decided from the class, not by evaluating ``theta`` at some size: a crop of fixed
        # pixel size has no map on an image smaller than the crop.
        cls = type(self)
        return not self.geometric or cls.theta is not Op.theta or cls.deaugment_dense is not Op.deaugment_dense

    def deaugment_dense(self, outputs: Tensor, mode: str = "bilinear") -> Tuple[Tensor, Tensor]:
        """De-augment dense outputs ``(N, K, h, w)``: returns outputs and validity ``(N, 1, h, w)``."""
        ones = torch.ones_like(outputs[:, :1], dtype=outputs.dtype if outputs.is_floating_point() else torch.float32)
        if not self.geometric:
            return outputs, ones
        theta = self.theta(outputs.shape[-2], outputs.shape[-1], outputs.device)
        if theta is None:
            raise ValueError(f"op {self.name} is geometric and has no inverse: its dense outputs cannot be de-augmented")
        return F.deaugment_dense(outputs, theta.expand(outputs.shape[0], 2, 3), mode=mode)

    def deaugment_keypoints(self, keypoints: Tensor, height: int, width: int) -> Tensor:
        """Map keypoints ``(N, P, 2)`` (``(x, y)`` in [0, 1]) of a view of an ``height x width``
        image back to input coordinates."""
        if not self.geometric:
            return keypoints
        theta = self.theta(height, width, keypoints.device)
        if theta is None:
            raise ValueError(f"op {self.name} is geometric and has no inverse for keypoints")
        return F.deaugment_keypoints(keypoints, theta)

    # -- row-parameter form
    def row_params(self) -> Tuple[float, ...]:
        raise NotImplementedError

    @classmethod
    def identity_row_params(cls) -> Tuple[float, ...]:
        raise NotImplementedError

    @classmethod
    def apply_rows(cls, images: Tensor, params: Tensor) -> Tensor:
        """Apply the family to ``images`` with per-row ``params`` ``(N, P)``."""
        raise NotImplementedError

    @classmethod
    def theta_rows(cls, params: Tensor, height: int, width: int) -> Optional[Tensor]:
        """Per-row view->input maps ``(N, 2, 3)`` for geometric families."""
        return None


def _format(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if not value.is_integer() or abs(value) >= 1e15 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return "x".join(_format(v) for v in value)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _number(value: Any, name: str, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{op}: {name} must be a finite number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- built-in ops


class Identity(Op):
    family = "identity"
    supports_rows = False

    def __init__(self) -> None:
        super().__init__()

    def apply(self, images: Tensor) -> Tensor:
        return images


class Rotate(Op):
    """Rotate by ``angle`` degrees counter-clockwise, bicubic, mirrored corners."""

    family = "rotate"
    geometric = True
    supports_rows = True

    def __init__(self, angle: float):
        angle = _number(angle, "angle", "rotate")
        super().__init__(angle=int(angle) if angle.is_integer() else angle)

    @property
    def name(self) -> str:
        return f"rotate({_format(self._params['angle'])})"

    def apply(self, images: Tensor) -> Tensor:
        return F.rotate(images, self._params["angle"])

    def theta(self, height, width, device="cpu"):
        return F.rotation_theta(torch.tensor([float(self._params["angle"])], device=device), height, width)[0]

    def row_params(self):
        return (float(self._params["angle"]),)

    @classmethod
    def identity_row_params(cls):
        return (0.0,)

    @classmethod
    def apply_rows(cls, images, params):
        return F.rotate(images, params[:, 0])

    @classmethod
    def theta_rows(cls, params, height, width):
        return F.rotation_theta(params[:, 0], height, width)


class Zoom(Op):
    """Zoom about the centre (``scale > 1`` zooms in); antialiased bicubic, mirrored borders."""

    family = "zoom"
    geometric = True
    supports_rows = True

    def __init__(self, scale: float):
        scale = _number(scale, "scale", "zoom")
        if scale <= 0:
            raise ValueError(f"zoom: scale must be > 0, got {scale}")
        super().__init__(scale=scale)

    def apply(self, images):
        return F.zoom(images, self._params["scale"])

    def theta(self, height, width, device="cpu"):
        return F.zoom_theta(torch.tensor([self._params["scale"]], device=device), height, width)[0]

    def row_params(self):
        return (self._params["scale"],)

    @classmethod
    def identity_row_params(cls):
        return (1.0,)

    @classmethod
    def apply_rows(cls, images, params):
        return F.zoom(images, params[:, 0])

    @classmethod
    def theta_rows(cls, params, height, width):
        return F.zoom_theta(params[:, 0], height, width)


class _Switch(Op):
    """A parameterless photometric op; its per-row form is an on/off flag per row."""

    supports_rows = True
    #: ``kernel(images, enabled=None)``; ``enabled`` (bool ``(N,)``) restricts it to some rows.
    kernel: ClassVar[Callable[..., Tensor]]

    def __init__(self) -> None:
        super().__init__()

    def apply(self, images):
        return type(self).kernel(images)

    def row_params(self):
        return (1.0,)

    @classmethod
    def identity_row_params(cls):
        return (0.0,)

    @classmethod
    def apply_rows(cls, images, params):
        return cls.kernel(images, enabled=params[:, 0] > 0.5)


class AutoContrast(_Switch):
    """``PIL.ImageOps.autocontrast`` (cutoff 0)."""

    family = "autocontrast"
    kernel = staticmethod(F.autocontrast)


class Equalize(_Switch):
    """``PIL.ImageOps.equalize``: per-channel histogram equalisation."""

    family = "equalize"
    kernel = staticmethod(F.equalize)


class _Factor(Op):
    """A photometric op with one blend ``factor`` (1 is the identity)."""

    supports_rows = True
    #: ``kernel(images, factor)``, ``factor`` a number or ``(N,)`` per-row tensor.
    kernel: ClassVar[Callable[..., Tensor]]
    #: PIL extrapolates below 0 for sharpness and colour; brightness and contrast refuse it.
    non_negative: ClassVar[bool] = False

    def __init__(self, factor: float):
        factor = _number(factor, "factor", self.family)
        if self.non_negative and factor < 0:
            raise ValueError(f"{self.family}: factor must be >= 0 (1 leaves the image unchanged), got {factor!r}")
        super().__init__(factor=factor)

    def apply(self, images):
        return type(self).kernel(images, self._params["factor"])

    def row_params(self):
        return (self._params["factor"],)

    @classmethod
    def identity_row_params(cls):
        return (1.0,)

    @classmethod
    def apply_rows(cls, images, params):
        return cls.kernel(images, params[:, 0])


class Sharpness(_Factor):
    """``PIL.ImageEnhance.Sharpness``."""

    family = "sharpness"
    kernel = staticmethod(F.sharpness)


class Color(_Factor):
    """``PIL.ImageEnhance.Color``."""

    family = "color"
    kernel = staticmethod(F.color)


class Brightness(_Factor):
    """``PIL.ImageEnhance.Brightness``: ``factor * x``."""

    family = "brightness"
    kernel = staticmethod(F.brightness)
    non_negative = True


class Contrast(_Factor):
    """``PIL.ImageEnhance.Contrast``: blend with the image's (8-bit rounded) mean grey level."""

    family = "contrast"
    kernel = staticmethod(F.contrast)
    non_negative = True


def _in_range(value: Any, name: str, op: str, lo: float, hi: float, what: str = "") -> float:
    value = _number(value, name, op)
    if not lo <= value <= hi:
        raise ValueError(f"{op}: {name} must be in [{_format(float(lo))}, {_format(float(hi))}]{what}, got {value!r}")
    return value


def _compact(value: float) -> Union[int, float]:
    """An integral float as an int (``rotate(20)``, not ``rotate(20.0)``), so names stay short."""
    return int(value) if value.is_integer() else value


class _Translate(Op):
    geometric = True
    supports_rows = True
    axis: ClassVar[str] = "x"

    def __init__(self, fraction: float):
        fraction = _in_range(fraction, "fraction", self.family, -1, 1, " (a fraction of the image side)")
        super().__init__(fraction=_compact(fraction))

    def apply(self, images):
        return F._translate(images, float(self._params["fraction"]), self.axis)

    def theta(self, height, width, device="cpu"):
        return F.translate_theta(torch.tensor([float(self._params["fraction"])], device=device), self.axis)[0]

    def row_params(self):
        return (float(self._params["fraction"]),)

    @classmethod
    def identity_row_params(cls):
        return (0.0,)

    @classmethod
    def apply_rows(cls, images, params):
        return F._translate(images, params[:, 0], cls.axis)

    @classmethod
    def theta_rows(cls, params, height, width):
        return F.translate_theta(params[:, 0], cls.axis)


class TranslateX(_Translate):
    """Move the content right by ``fraction`` of the width (left if negative), mirrored fill."""

    family = "translate_x"
    axis = "x"


class TranslateY(_Translate):
    """Move the content down by ``fraction`` of the height (up if negative), mirrored fill."""

    family = "translate_y"
    axis = "y"


class _Shear(Op):
    geometric = True
    supports_rows = True
    axis: ClassVar[str] = "x"

    def __init__(self, shear: float):
        shear = _in_range(shear, "shear", self.family, -1, 1)
        super().__init__(shear=_compact(shear))

    def apply(self, images):
        return F._shear(images, float(self._params["shear"]), self.axis)

    def theta(self, height, width, device="cpu"):
        return F.shear_theta(torch.tensor([float(self._params["shear"])], device=device), self.axis, height, width)[0]

    def row_params(self):
        return (float(self._params["shear"]),)

    @classmethod
    def identity_row_params(cls):
        return (0.0,)

    @classmethod
    def apply_rows(cls, images, params):
        return F._shear(images, params[:, 0], cls.axis)

    @classmethod
    def theta_rows(cls, params, height, width):
        return F.shear_theta(params[:, 0], cls.axis, height, width)


class ShearX(_Shear):
    """Shear along x about the centre: ``(X, Y)`` reads ``(X + shear * Y, Y)``; bicubic, mirrored fill."""

    family = "shear_x"
    axis = "x"


class ShearY(_Shear):
    """Shear along y about the centre: ``(X, Y)`` reads ``(X, Y + shear * X)``; bicubic, mirrored fill."""

    family = "shear_y"
    axis = "y"


class Posterize(Op):
    """``PIL.ImageOps.posterize``: keep the ``bits`` (1-8) high bits of each 8-bit level."""

    family = "posterize"
    supports_rows = True

    def __init__(self, bits: int):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"posterize: bits must be an integer in [1, 8] (8 leaves the image unchanged), got {bits!r}")
        super().__init__(bits=bits)

    def apply(self, images):
        return F.posterize(images, self._params["bits"])

    def row_params(self):
        return (float(self._params["bits"]),)

    @classmethod
    def identity_row_params(cls):
        return (8.0,)

    @classmethod
    def apply_rows(cls, images, params):
        return F.posterize(images, params[:, 0])


class Solarize(Op):
    """``PIL.ImageOps.solarize`` with PIL's threshold / 255: pixels ``>= threshold`` are inverted."""

    family = "solarize"
    supports_rows = True

    def __init__(self, threshold: float):
        threshold = _in_range(threshold, "threshold", "solarize", 0, 1, " (PIL's threshold / 255)")
        super().__init__(threshold=threshold)

    def apply(self, images):
        return F.solarize(images, self._params["threshold"])

    def row_params(self):
        return (float(self._params["threshold"]),)

    @classmethod
    def identity_row_params(cls):
        return (2.0,)  # above every pixel: nothing inverted

    @classmethod
    def apply_rows(cls, images, params):
        return F.solarize(images, params[:, 0])


class _ExactGeometric(Op):
    """Ops whose inverse is an exact pixel permutation (flips, quarter turns)."""

    geometric = True

    def inverse(self, outputs: Tensor) -> Tensor:
        raise NotImplementedError

    def deaugment_dense(self, outputs, mode="bilinear"):
        ones = torch.ones_like(outputs[:, :1], dtype=outputs.dtype if outputs.is_floating_point() else torch.float32)
        return self.inverse(outputs), ones

    def deaugment_keypoints(self, keypoints, height, width):
        return F.deaugment_keypoints(keypoints, self.theta(height, width, keypoints.device))


class HFlip(_ExactGeometric):
    family = "hflip"

    def __init__(self) -> None:
        super().__init__()

    def apply(self, images):
        return F.hflip(images)

    def inverse(self, outputs):
        return F.hflip(outputs)

    def theta(self, height, width, device="cpu"):
        t = torch.tensor([True], device=device)
        return F.flip_theta(t, ~t)[0]


class VFlip(_ExactGeometric):
    family = "vflip"

    def __init__(self) -> None:
        super().__init__()

    def apply(self, images):
        return F.vflip(images)

    def inverse(self, outputs):
        return F.vflip(outputs)

    def theta(self, height, width, device="cpu"):
        t = torch.tensor([True], device=device)
        return F.flip_theta(~t, t)[0]


class Rot90(_ExactGeometric):
    """Quarter turns counter-clockwise (``torch.rot90``); square images only."""

    family = "rot90"

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"rot90: k must be an int, got {k!r}")
        super().__init__(k=k % 4)

    def apply(self, images):
        if self._params["k"] % 2 and images.shape[-1] != images.shape[-2]:
            raise ValueError(
                f"rot90: odd quarter turns need square images so every view has the input's shape, "
                f"got {images.shape[-2]}x{images.shape[-1]}"
            )
        return F.rot90(images, self._params["k"])

    def inverse(self, outputs):
        return F.rot90(outputs, -self._params["k"])

    def theta(self, height, width, device="cpu"):
        return F.rot90_theta(torch.tensor([self._params["k"]], device=device))[0]


CROP_POSITIONS = ("left_top", "left_bottom", "right_bottom", "right_top", "center")


class CropResize(Op):
    """Crop one of ttach's five positions and resize the crop back to the input size.

    ``size`` is ``(height, width)`` in pixels (ints) or as fractions of the image (floats in
    (0, 1]); the upsampling back to the input size is bilinear.
    """

    family = "crop"
    geometric = True

    def __init__(self, position: str, size: Union[int, float, Sequence[Union[int, float]]]):
        if position not in CROP_POSITIONS:
            raise ValueError(f"crop: position must be one of {CROP_POSITIONS}, got {position!r}")
        if isinstance(size, (int, float)):
            size = (size, size)
        size = tuple(size)
        if len(size) != 2:
            raise ValueError(f"crop: size must be (height, width), got {size!r}")
        for s in size:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0:
                raise ValueError(f"crop: size must hold positive pixel counts or fractions, got {size!r}")
            if isinstance(s, float) and s > 1:
                raise ValueError(f"crop: fractional size must be in (0, 1], got {size!r}")
        super().__init__(position=position, size=size)

    @property
    def name(self) -> str:
        h, w = self._params["size"]
        return f"crop_{self._params['position']}({_format(h)}x{_format(w)})"

    def box(self, height: int, width: int) -> Tuple[int, int, int, int]:
        ch, cw = self._params["size"]
        ch = int(round(ch * height)) if isinstance(ch, float) else ch
        cw = int(round(cw * width)) if isinstance(cw, float) else cw
        boxes = F.five_crop_boxes(height, width, ch, cw)
        return boxes[CROP_POSITIONS.index(self._params["position"])]

    def apply(self, images):
        return F.crop_resize(images, self.box(images.shape[-2], images.shape[-1]))

    def theta(self, height, width, device="cpu"):
        box = torch.tensor([self.box(height, width)], dtype=torch.float64, device=device)
        return F.crop_theta(box, height, width)[0]


class ResizeCrop(Op):
    """A crop as the paper evaluates crops (torchvision's ``Resize`` then ``CenterCrop`` /
    ``FiveCrop``): the image is resized up by ``1 / fraction`` (each side ``floor(side /
    fraction)``, as timm's ``crop_pct``; bilinear, antialiased like PIL) and a window of the
    *input's* size is cut at ``position``, with no resize back. So a view has the input's shape
    and is an affine map of it (``theta``), unlike :class:`CropResize`, which crops a fraction of
    the input and upsamples it. The centre window starts at ``round((resized - size) / 2)``
    (torchvision's ``center_crop``)."""

    family = "resize_crop"
    geometric = True

    def __init__(self, position: str, fraction: float = 0.875):
        if position not in CROP_POSITIONS:
            raise ValueError(f"resize_crop: position must be one of {CROP_POSITIONS}, got {position!r}")
        fraction = _number(fraction, "fraction", "resize_crop")
        if not 0 < fraction <= 1:
            raise ValueError(f"resize_crop: fraction (crop side / resized side) must be in (0, 1], got {fraction}")
        super().__init__(position=position, fraction=fraction)

    @property
    def name(self) -> str:
        return f"resize_crop_{self._params['position']}({_format(self._params['fraction'])})"

    def resized_size(self, height: int, width: int) -> Tuple[int, int]:
        """``(height, width)`` of the resized image the window is cut from."""
        f = self._params["fraction"]
        return int(math.floor(height / f + 1e-9)), int(math.floor(width / f + 1e-9))

    def offset(self, height: int, width: int) -> Tuple[int, int]:
        """``(left, top)`` of the window in the resized image."""
        rh, rw = self.resized_size(height, width)
        dx, dy = rw - width, rh - height
        return {"left_top": (0, 0), "left_bottom": (0, dy), "right_bottom": (dx, dy), "right_top": (dx, 0),
                "center": (int(round(dx / 2.0)), int(round(dy / 2.0)))}[self._params["position"]]

    def apply(self, images):
        F.check_images(images, check_range=False)
        h, w = images.shape[-2:]
        rh, rw = self.resized_size(h, w)
        left, top = self.offset(h, w)
        work = F._sample_dtype(images)
        if F._channels_last(work):
            work = work.contiguous()
        resized = torch.nn.functional.interpolate(work, size=(rh, rw), mode="bilinear", align_corners=False,
                                                  antialias=True)
        return resized[..., top:top + h, left:left + w].contiguous().to(images.dtype)

    def theta(self, height, width, device="cpu"):
        rh, rw = self.resized_size(height, width)
        left, top = self.offset(height, width)
        # The window in input pixels: resized coordinates scaled by input / resized.
        box = torch.tensor([[left * width / rw, top * height / rh, (left + width) * width / rw,
                             (top + height) * height / rh]], dtype=torch.float64, device=device)
        return F.crop_theta(box, height, width)[0]



class CallableOp(Op):
    """Wrap user callables as an op.

    ``fn(images) -> images`` augments; for a geometric op pass ``deaugment_dense(outputs) ->
    outputs`` (validity is then taken as all ones) and optionally ``deaugment_keypoints``.
    ``name`` must identify the behaviour: it enters the space's fingerprint.
    """

    family = "callable"

    def __init__(
        self,
        name: str,
        fn: Callable[[Tensor], Tensor],
        geometric: bool = False,
        deaugment_dense: Optional[Callable[[Tensor], Tensor]] = None,
        deaugment_keypoints: Optional[Callable[[Tensor], Tensor]] = None,
    ):
        if not isinstance(name, str) or not name:
            raise ValueError("CallableOp: name must be a non-empty string")
        if not callable(fn):
            raise TypeError(f"CallableOp {name}: fn must be callable")
        super().__init__(name=name)
        self._fn = fn
        self._geometric = bool(geometric)
        self._deaug = deaugment_dense
        self._deaug_kp = deaugment_keypoints

    @property
    def name(self) -> str:
        return self._params["name"]

    @property
    def geometric(self) -> bool:  # type: ignore[override]
        return self._geometric

    @property
    def invertible(self) -> bool:
        return not self._geometric or self._deaug is not None

    def apply(self, images):
        return self._fn(images)

    def deaugment_dense(self, outputs, mode="bilinear"):
        ones = torch.ones_like(outputs[:, :1], dtype=outputs.dtype if outputs.is_floating_point() else torch.float32)
        if not self._geometric:
            return outputs, ones
        if self._deaug is None:
            raise ValueError(f"op {self.name} is geometric and has no de-augmentation for dense outputs")
        return self._deaug(outputs), ones

    def deaugment_keypoints(self, keypoints, height, width):
        if not self._geometric:
            return keypoints
        if self._deaug_kp is None:
            raise ValueError(f"op {self.name} is geometric and has no de-augmentation for keypoints")
        return self._deaug_kp(keypoints)


BUILTIN_OPS = {
    cls.family: cls
    for cls in (Identity, Rotate, Zoom, AutoContrast, Sharpness, Color, HFlip, VFlip, Rot90, CropResize,
                ResizeCrop, TranslateX, TranslateY, ShearX, ShearY, Brightness, Contrast, Equalize, Posterize,
                Solarize)
}
