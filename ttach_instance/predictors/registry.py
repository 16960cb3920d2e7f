"""The predictor registry: the only way a name (in code or in a checkpoint) becomes an architecture."""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Type, TypeVar, Union

import torch

from ..io import header_tensors, read_meta
from ..space import TransformSpace
from .base import (CHECKPOINT_KIND, FORMAT_VERSION, Field, LossPredictorBase, check_merge_temperatures,
                   check_model_image_size, ensure_strict_match, validate_config)
from .calibration import IdentityCalibration

__all__ = ["register_predictor", "create_predictor", "load_predictor", "list_predictors", "read_checkpoint_metadata"]

_REGISTRY: Dict[str, Type[LossPredictorBase]] = {}
P = TypeVar("P", bound=Type[LossPredictorBase])


def register_predictor(name: str) -> Callable[[P], P]:
    """Class decorator: make a :class:`LossPredictorBase` subclass known as ``name`` to
    :func:`create_predictor` and to checkpoints. Registering a taken name is an error."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"predictor name must be an identifier-like string, got {name!r}")

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, LossPredictorBase)):
            raise TypeError(f"register_predictor({name!r}) takes a LossPredictorBase subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"predictor architecture {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_predictors() -> List[str]:
    """The registered architecture names."""
    return sorted(_REGISTRY)


def _architecture(name: object, where: str) -> Type[LossPredictorBase]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"{where}: unknown predictor architecture {name!r}; registered: {list_predictors()} "
                         f"(register others with ttach_instance.predictors.register_predictor before loading)")
    return _REGISTRY[name]


def create_predictor(name: str, space: Union[TransformSpace, str], **config) -> LossPredictorBase:
    """A fresh predictor of the registered architecture ``name`` for ``space``."""
    return _architecture(name, "create_predictor")(space, **config)


def read_checkpoint_metadata(path: Union[str, os.PathLike]) -> Dict:
    """A predictor checkpoint's metadata, read from the file header alone (no tensor is loaded),
    checked for kind and format version. ``ValueError`` naming the file otherwise."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"predictor checkpoint must be a .safetensors file, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"predictor checkpoint {path!r} does not exist")
    meta = read_meta(path, f"predictor checkpoint {path!r}")
    if not isinstance(meta, dict) or meta.get("kind") != CHECKPOINT_KIND:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise ValueError(f"{path!r} is not a ttach-instance loss predictor checkpoint (kind {kind!r}, expected "
                         f"{CHECKPOINT_KIND!r}); checkpoints of ttach-instance 0.1 (kinds 'loss-predictor', "
                         f"'small-loss-predictor') are no longer read: fit the predictor again")
    if type(meta.get("format_version")) is not int or meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"predictor checkpoint {path!r} has format version {meta.get('format_version')!r}; this "
                         f"ttach-instance reads version {FORMAT_VERSION} only: fit the predictor again")
    return meta


def _checked_calibration(value: object, num_candidates: int, where: str) -> Optional[Dict]:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"identity", "num_features"}:
        raise ValueError(f"{where}: calibration must be null or {{'identity', 'num_features'}}, got {value!r}")
    identity = Field("int", 0, num_candidates - 1).validate("calibration.identity", value["identity"], where)
    features = Field("int", 1, 1 << 16, optional=True).validate("calibration.num_features", value["num_features"],
                                                                 where)
    return {"identity": identity, "num_features": features}


def load_predictor(path: Union[str, os.PathLike], space: Optional[Union[TransformSpace, str]] = None,
                   map_location: Union[str, torch.device] = "cpu",
                   architecture: Optional[Type[LossPredictorBase]] = None) -> LossPredictorBase:
    """Rebuild a predictor from a :meth:`~LossPredictorBase.save` checkpoint, in eval mode on
    ``map_location``.

    Every metadata field is validated (registered architecture, constructor arguments within the
    architecture's bounds, the space rebuilt from the space registry and matched by fingerprint,
    sizes bounded) before anything is built; then the weights are loaded strictly. ``space``:
    the space to bind (default: rebuilt from the recorded name and parameters). ``architecture``:
    refuse checkpoints of any other class. Every failure is a ``ValueError`` naming the file.
    """
    from ..io import load_tensors
    from ..registry import get_space, space_from_record

    path = os.fspath(path)
    meta = read_checkpoint_metadata(path)
    where = f"predictor checkpoint {path!r}"
    cls = _architecture(meta.get("architecture"), where)
    if architecture is not None and cls is not architecture and not issubclass(cls, architecture):
        raise ValueError(f"{where} holds a {cls.__name__} ({cls.architecture!r}), not a {architecture.__name__}")
    config = validate_config(cls, meta.get("config"), where)
    size = check_model_image_size(meta.get("model_image_size"), where)
    names = meta.get("candidate_names")
    fingerprint = meta.get("space_fingerprint")
    if not isinstance(fingerprint, str) or not isinstance(names, list):
        raise ValueError(f"{where}: metadata lacks the space's fingerprint and candidate names")
    if space is None:
        space = space_from_record(meta, where)
    elif isinstance(space, str):
        space = get_space(space)
    if space.fingerprint != fingerprint:
        raise ValueError(f"space {space.name!r} (fingerprint {space.fingerprint}) is not the space the predictor "
                         f"{path!r} was trained for ({meta.get('space')!r}, fingerprint {fingerprint})")
    calibration = _checked_calibration(meta.get("calibration"), len(space), where)
    temperatures = check_merge_temperatures(meta.get("merge_temperatures"), len(space), where)
    # The file's tensors against the architecture built on the meta device (no memory): a small
    # tampered file cannot make loading allocate a large model it does not hold the weights of.
    probe = _build(cls, space, config, calibration, where, device="meta")
    if probe is not None:
        ensure_strict_match(probe, header_tensors(path, where), where)
    predictor = _build(cls, space, config, calibration, where)
    try:
        tensors, _ = load_tensors(path)
    except Exception as e:  # noqa: BLE001 - a truncated body after a good header
        raise ValueError(f"{where} is unreadable (truncated or damaged): {e}") from e
    ensure_strict_match(predictor, tensors, where)
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise ValueError(f"{where}: tensors {broken[:5]} hold NaN or infinite values (damaged, or saved from a "
                         f"diverged fit)")
    predictor.load_state_dict(tensors, strict=True)
    predictor.model_image_size = size
    predictor.merge_temperatures = temperatures
    return predictor.to(map_location).eval()


def _build(cls: Type[LossPredictorBase], space: TransformSpace, config: Dict, calibration: Optional[Dict], where: str,
           device: Optional[str] = None) -> Optional[LossPredictorBase]:
    """``cls(space, **config)`` with its calibration. On the ``meta`` device: ``None`` when the
    architecture cannot be built there (it is then checked after the real build); otherwise any
    failure is a ``ValueError`` naming the checkpoint."""
    try:
        if device is None:
            predictor = cls(space, **config)
        else:
            with torch.device(device):
                predictor = cls(space, **config)
        if calibration is not None:
            predictor.calibration = IdentityCalibration(**calibration)
        return predictor
    except Exception as e:  # noqa: BLE001 - whatever the architecture raises, with the file named
        if device is not None:
            return None
        raise ValueError(f"{where}: architecture {cls.architecture!r} cannot be built with its config {config} "
                         f"({type(e).__name__}: {e})") from e
