"""The loss predictor's base class and its one checkpoint schema.

A loss predictor maps pixels in [0, 1] ``(B, 3, H, W)`` to one predicted *relative loss* per
candidate of its :class:`~ttach_instance.space.TransformSpace` -- float32 ``(B, len(space))``,
**lower = better**; only the order and the differences within a row carry meaning.
``forward = head_scores . features``: ``features`` (the architecture's), then the named linear
``head``, then the optional :class:`~ttach_instance.predictors.calibration.IdentityCalibration`.

Checkpoints are one ``.safetensors`` file: the weights, and JSON metadata that names the
architecture by its *registry* name and its constructor arguments. Loading validates every
metadata field against the architecture's schema (types and bounds) before anything is built:
a checkpoint cannot name code to import, a file to open or a giant size to allocate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..space import TransformSpace

__all__ = ["FORMAT_VERSION", "CHECKPOINT_KIND", "Field", "LossPredictorBase", "checked_pixels",
           "resize_antialiased"]

#: Version of the predictor checkpoint schema; files of any other version are refused.
FORMAT_VERSION = 2
CHECKPOINT_KIND = "ttach_instance.loss_predictor"
#: Largest image side a checkpoint may ask for (model_image_size, input_size): 4096 px.
MAX_SIDE = 4096


def checked_pixels(pixels: Tensor) -> Tensor:
    """A predictor's input validated: a floating ``(B, 3, H, W)`` tensor, at least one image.
    Half types come back as float32 (resample and normalise in float32 on every device)."""
    if not isinstance(pixels, Tensor):
        raise TypeError(f"pixels must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(pixels).__name__}")
    if not pixels.is_floating_point():
        raise TypeError(f"pixels must be a floating tensor with values in [0, 1], got dtype {pixels.dtype} "
                        f"(convert uint8 images with images.float() / 255)")
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must have shape (B, 3, H, W) (RGB), got {tuple(pixels.shape)}")
    if pixels.shape[0] == 0:
        raise ValueError("pixels must hold at least one image, got an empty batch")
    return pixels if pixels.dtype in (torch.float32, torch.float64) else pixels.float()


def resize_antialiased(x: Tensor, side: int) -> Tensor:
    """``x`` resized (bilinear, antialiased) to ``side x side``; untouched when already that size."""
    if tuple(x.shape[-2:]) == (side, side):
        return x
    return nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class Field:
    """One constructor argument of an architecture as a checkpoint may state it.

    ``kind``: ``"int"``, ``"float"``, ``"str"``, ``"floats"`` (a list of numbers) or ``"ints"``;
    ``low``/``high``: inclusive bounds (of the value, or of every element); ``length``: exact list
    length (``"floats"``/``"ints"``), or ``max_length``; ``optional``: ``None`` is accepted;
    ``check``: an extra predicate on the value with its description.
    """

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    optional: bool = False
    length: Optional[int] = None
    max_length: Optional[int] = None
    check: Optional[Tuple[Callable[[Any], bool], str]] = None

    def validate(self, name: str, value: Any, where: str) -> Any:
        def fail(expected: str):
            shown = repr(value)
            shown = shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"
            raise ValueError(f"{where}: {name} must be {expected}, got {shown}")

        if value is None:
            if self.optional:
                return None
            fail(f"a {self.kind} value")
        bounds = f" in [{self.low}, {self.high}]"
        if self.kind in ("int", "float"):
            ok_type = isinstance(value, int) if self.kind == "int" else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type or not (isinstance(value, int) or math.isfinite(value)):
                fail(f"a finite {self.kind}{bounds}")
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                fail(f"a {self.kind}{bounds}")
            value = int(value) if self.kind == "int" else float(value)
        elif self.kind == "str":
            if not isinstance(value, str) or not value or len(value) > 200:
                fail("a non-empty string of at most 200 characters")
        elif self.kind in ("floats", "ints"):
            element = Field("int" if self.kind == "ints" else "float", self.low, self.high)
            if not isinstance(value, (list, tuple)):
                fail(f"a list of {self.kind[:-1]}s")
            if (self.length is not None and len(value) != self.length) or (
                    self.max_length is not None and len(value) > self.max_length):
                fail(f"a list of {self.length or f'at most {self.max_length}'} {self.kind[:-1]}s{bounds}")
            value = [element.validate(f"{name}[{i}]", v, where) for i, v in enumerate(value)]
        else:  # pragma: no cover - a schema bug, not user input
            raise AssertionError(f"unknown field kind {self.kind!r}")
        if self.check is not None and not self.check[0](value):
            fail(self.check[1])
        return value


def validate_config(cls: type, config: Any, where: str) -> Dict[str, Any]:
    """``config`` checked against ``cls.config_schema``: a dict with exactly the schema's keys,
    every value of its type and within its bounds. ``ValueError`` naming ``where`` and the key."""
    schema: Dict[str, Field] = cls.config_schema
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config must be a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - set(schema))
    missing = sorted(set(schema) - set(config))
    if unknown or missing:
        raise ValueError(f"{where}: config for architecture {cls.architecture!r} must have the keys "
                         f"{sorted(schema)}; unknown {unknown}, missing {missing}")
    return {name: field.validate(name, config[name], where) for name, field in schema.items()}


class LossPredictorBase(nn.Module):
    """Base of every loss predictor architecture: space binding, pixel checks, a named ``head``,
    a ``calibration`` slot, and one checkpoint schema.

    Subclasses set ``config_schema`` (constructor argument -> :class:`Field`), build their
    layers and ``self.head`` (an ``nn.Linear`` to ``len(space)`` scores) in ``__init__``, and
    implement :meth:`features` and :meth:`config`. They are made known to checkpoints with
    :func:`~ttach_instance.predictors.register_predictor`.

    ``model_image_size``: ``(H, W)`` of the images the *target model* saw when the loss labels
    were made (set by the fit, saved with the weights; ``None`` when unknown): the size to bring
    images to before the wrapper, not the predictor's own ``input_size``.
    """

    #: Registry name, set by :func:`~ttach_instance.predictors.register_predictor`.
    architecture: str = ""
    config_schema: Dict[str, Field] = {}

    def __init__(self, space: Union[TransformSpace, str], input_size: int):
        super().__init__()
        from ..registry import get_space

        if isinstance(space, str):
            space = get_space(space)
        if not isinstance(space, TransformSpace):
            raise TypeError(f"space must be a TransformSpace or a registered space name, got {type(space).__name__}")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or not 8 <= input_size <= MAX_SIDE:
            raise ValueError(f"input_size must be an int in [8, {MAX_SIDE}], got {input_size!r}")
        self.space = space
        self.space_fingerprint = space.fingerprint
        self.candidate_names: List[str] = list(space.names)
        self.input_size = int(input_size)
        self.model_image_size: Optional[Tuple[int, int]] = None
        self.register_module("calibration", None)
        #: Temperatures of the loss-weighted merge fitted on validation data, one per wrapper setting
        #: (``k``, ``flip``, ``merge_space``): :func:`ttach_instance.fusion.store_temperature`; saved in
        #: the checkpoint metadata and used by the loss-guided wrappers given no ``temperature``.
        self.merge_temperatures: List[Dict[str, Any]] = []

    # -- forward ---------------------------------------------------------------------------
    def features(self, pixels: Tensor) -> Tensor:
        """``(B, F)``: the vector the ranking head reads."""
        raise NotImplementedError

    def head_scores(self, features: Tensor) -> Tensor:
        """Ranking head then calibration: :meth:`features` -> relative losses ``(B, T)`` float32."""
        scores = self.head(features).float()
        return scores if self.calibration is None else self.calibration(scores, features)

    def forward(self, pixels: Tensor) -> Tensor:
        """Relative losses ``(B, len(space))`` float32, lower = better."""
        return self.head_scores(self.features(pixels))

    # -- checkpoints -----------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """Every constructor argument but the space (JSON values): ``type(self)(space, **config())``."""
        raise NotImplementedError

    def metadata(self) -> Dict[str, Any]:
        from .. import __version__

        return {"kind": CHECKPOINT_KIND, "format_version": FORMAT_VERSION, "architecture": self.architecture,
                "config": self.config(), "space": self.space.name, "space_params": self.space.params,
                "space_fingerprint": self.space_fingerprint, "candidate_names": self.candidate_names,
                "model_image_size": None if self.model_image_size is None else list(self.model_image_size),
                "calibration": None if self.calibration is None else self.calibration.config(),
                "merge_temperatures": [dict(e) for e in self.merge_temperatures],
                "versions": {"ttach_instance": __version__, "torch": torch.__version__}}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write weights + metadata to one ``.safetensors`` file (atomically; no pickle)."""
        from ..io import atomic_save_tensors

        if not type(self).__dict__.get("architecture"):  # a subclass does not inherit its parent's name
            raise TypeError(f"{type(self).__name__} is not registered (ttach_instance.predictors.register_predictor): "
                            f"a checkpoint must name a registered architecture, and would load as that class")
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".safetensors"):
            raise ValueError(f"path must end in .safetensors, got {path!r}")
        atomic_save_tensors(os.fspath(path), self.state_dict(), self.metadata())


def check_model_image_size(value: Any, where: str) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    size = Field("ints", 1, MAX_SIDE, length=2).validate("model_image_size", value, where)
    return size[0], size[1]


#: One fitted temperature of the weighted merge as a checkpoint states it (``merge_temperatures``).
TEMPERATURE_SCHEMA = {"k": Field("int", 1, 1 << 16), "flip": None, "merge_space": None,
                      "temperature": Field("float", 1e-30, 1e30), "objective": None, "images": Field("int", 1, 1 << 40),
                      "nll": Field("float", 0.0), "nll_at_1": Field("float", 0.0)}


def check_merge_temperatures(value: Any, num_candidates: int, where: str) -> List[Dict[str, Any]]:
    """A checkpoint's ``merge_temperatures``: absent or null (none fitted) or a list of at most 64
    entries with exactly :data:`TEMPERATURE_SCHEMA`'s keys, ``k`` at most the space's candidates,
    ``merge_space`` one of the merge spaces, ``objective`` ``"nll"``, no setting twice."""
    from ..merge import MERGE_SPACES

    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 64:
        raise ValueError(f"{where}: merge_temperatures must be null or a list of at most 64 entries, got "
                         f"{type(value).__name__}")
    out, seen = [], set()
    for i, entry in enumerate(value):
        name = f"merge_temperatures[{i}]"
        if not isinstance(entry, dict) or set(entry) != set(TEMPERATURE_SCHEMA):
            raise ValueError(f"{where}: {name} must be an object with the keys {sorted(TEMPERATURE_SCHEMA)}, got "
                             f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}")
        checked = {key: field.validate(f"{name}.{key}", entry[key], where)
                   for key, field in TEMPERATURE_SCHEMA.items() if field is not None}
        if checked["k"] > num_candidates:
            raise ValueError(f"{where}: {name}.k must be at most the space's {num_candidates} candidates, got "
                             f"{checked['k']}")
        if not isinstance(entry["flip"], bool) or entry["merge_space"] not in MERGE_SPACES \
                or entry["objective"] != "nll":
            raise ValueError(f"{where}: {name} must have flip true/false, merge_space one of {list(MERGE_SPACES)} "
                             f"and objective 'nll', got {entry['flip']!r}, {entry['merge_space']!r}, "
                             f"{entry['objective']!r}")
        key = (checked["k"], entry["flip"], entry["merge_space"])
        if key in seen:
            raise ValueError(f"{where}: {name} repeats the setting k={key[0]}, flip={key[1]}, merge_space={key[2]!r}")
        seen.add(key)
        out.append({**checked, "flip": entry["flip"], "merge_space": entry["merge_space"], "objective": "nll"})
    return out


def ensure_strict_match(predictor: nn.Module, tensors: Dict[str, Tensor], where: str) -> None:
    """``ValueError`` listing missing, unexpected or reshaped tensors (against ``predictor``'s
    state dict), or tensors of a non-floating dtype where the predictor holds floats."""
    own = predictor.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [f"{k} {tuple(tensors[k].shape)} {tensors[k].dtype} (expected {tuple(v.shape)} {v.dtype})"
             for k, v in own.items() if k in tensors and (tensors[k].shape != v.shape
                                                          or tensors[k].is_floating_point() != v.is_floating_point())]
    if missing or unexpected or wrong:
        parts = [f"missing tensors {missing}" if missing else "",
                 f"unexpected tensors {unexpected}" if unexpected else "", f"mismatched {wrong}" if wrong else ""]
        raise ValueError(f"{where} does not match {type(predictor).__name__}({predictor.config()}): "
                         + "; ".join(p for p in parts if p))
