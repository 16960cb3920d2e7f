"""Model weights that carry their spec: a target model saved so that ``--model`` can be omitted.

:func:`save_model` writes the state dict as one safetensors file whose JSON metadata records
how to build the model again: ``{"model_spec": {"kind", "format_version", "factory",
"kwargs"}}``. :func:`load_model` rebuilds it from the file alone.

A file is data, never code: its ``factory`` must be on the allow-list -- a factory registered
here (``ttach_instance.models:small_resnet``, or yours with :func:`register_model_factory`) or
``timm:<registered timm model name>``, built with ``pretrained=False`` -- and its ``kwargs`` must
pass that factory's schema (types, bounds, no unknown keys). Nothing a file names is imported.
Every refusal is a ``ValueError`` naming the file and the field. A user who wants their own
``package.module:factory`` passes it as ``--model`` (their code, by choice), as before.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .models import small_resnet
from .predictors.base import Field

__all__ = ["MODEL_SPEC_KIND", "MODEL_SPEC_FORMAT", "register_model_factory", "list_model_factories",
           "check_model_spec", "save_model", "read_model_spec", "load_model"]

MODEL_SPEC_KIND = "ttach_instance.model"
#: Version of the ``model_spec`` record; files of any other version are refused.
MODEL_SPEC_FORMAT = 1
_CLASSES = Field("int", 1, 1 << 20)

#: name -> (factory, kwargs schema). The only factories a file may name, besides ``timm:<name>``.
_FACTORIES: Dict[str, Tuple[Callable[..., nn.Module], Dict[str, Field]]] = {}

#: What a file may pass to a timm model: nothing that fetches or reads weights.
TIMM_SCHEMA: Dict[str, Field] = {
    "num_classes": Field("int", 0, 1 << 20),
    "in_chans": Field("int", 1, 64),
    "drop_rate": Field("float", 0.0, 0.999),
    "drop_path_rate": Field("float", 0.0, 0.999),
}


def register_model_factory(name: str, factory: Callable[..., nn.Module], schema: Mapping[str, Field]) -> None:
    """Allow files to name ``factory`` as ``name`` (e.g. ``"mypkg.models:net"``), with the
    constructor arguments ``schema`` declares (``num_classes`` is always allowed). Registering
    a taken name for another factory is an error."""
    if not isinstance(name, str) or not name or name.startswith("timm:"):
        raise ValueError(f"model factory name must be a non-empty string not starting with 'timm:', got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_model_factory({name!r}): factory must be callable, got {factory!r}")
    if name in _FACTORIES and _FACTORIES[name][0] is not factory:
        raise ValueError(f"model factory {name!r} is already registered")
    _FACTORIES[name] = (factory, {"num_classes": _CLASSES, **dict(schema)})


register_model_factory("ttach_instance.models:small_resnet", small_resnet,
                       {"width": Field("int", 1, 512), "blocks": Field("int", 1, 16)})


def list_model_factories() -> List[str]:
    """The factories a weights file may name (``timm:<name>`` stands for any timm model)."""
    return sorted(_FACTORIES) + ["timm:<timm model name>"]


def _timm_name(factory: str) -> Optional[str]:
    """``NAME`` of ``timm:NAME`` when timm registers it (no tags, hub ids or paths), else ``None``."""
    if not factory.startswith("timm:"):
        return None
    import timm

    name = factory[5:]
    return name if name and ":" not in name and "/" not in name and "." not in name and timm.is_model(name) else None


def check_model_spec(spec: Any, where: str) -> Dict[str, Any]:
    """``spec`` (``{"kind", "format_version", "factory", "kwargs"}``) validated against the
    allow-list and the factory's schema: ``{"factory", "kwargs"}``; ``ValueError`` naming
    ``where`` and the field otherwise."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: model_spec must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"kind", "format_version", "factory", "kwargs"})
    if unknown:
        raise ValueError(f"{where}: model_spec has unknown fields {unknown}")
    if spec.get("kind") != MODEL_SPEC_KIND:
        raise ValueError(f"{where}: model_spec.kind must be {MODEL_SPEC_KIND!r}, got {spec.get('kind')!r}")
    version = spec.get("format_version")
    if type(version) is not int or version != MODEL_SPEC_FORMAT:
        raise ValueError(f"{where}: model_spec.format_version is {version!r}; this ttach-instance reads version "
                         f"{MODEL_SPEC_FORMAT} only: save the model again")
    factory = spec.get("factory")
    if not isinstance(factory, str) or len(factory) > 200:
        raise ValueError(f"{where}: model_spec.factory must be a string, got {str(factory)[:200]!r}")
    if factory in _FACTORIES:
        schema = _FACTORIES[factory][1]
    elif _timm_name(factory) is not None:
        schema = TIMM_SCHEMA
    else:
        raise ValueError(f"{where}: model_spec.factory {factory!r} is not an allow-listed model factory "
                         f"({', '.join(list_model_factories())}); a file never names code to run: build your own "
                         f"model with --model package.module:factory")
    kwargs = spec.get("kwargs")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: model_spec.kwargs must be a JSON object, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(schema))
    if unknown:
        raise ValueError(f"{where}: model_spec.kwargs has keys {unknown} that {factory!r} does not take from a file "
                         f"(allowed: {sorted(schema)})")
    return {"factory": factory,
            "kwargs": {k: schema[k].validate(f"model_spec.kwargs.{k}", v, where) for k, v in kwargs.items()}}


def _spec_record(factory: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {"kind": MODEL_SPEC_KIND, "format_version": MODEL_SPEC_FORMAT, "factory": factory, "kwargs": dict(kwargs)}


def _construct(spec: Dict[str, Any]) -> nn.Module:
    factory, kwargs = spec["factory"], spec["kwargs"]
    if factory in _FACTORIES:
        return _FACTORIES[factory][0](**kwargs)
    import timm

    return timm.create_model(_timm_name(factory), pretrained=False, **kwargs)


def save_model(path: str, model: nn.Module, factory: str, kwargs: Optional[Dict[str, Any]] = None,
               meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``model``'s state dict to ``path`` (``.safetensors``, atomically) with the spec
    ``factory(**kwargs)`` that builds it (checked against the allow-list now, so every saved file
    loads back) and ``meta`` (more JSON, e.g. the training size). Returns ``{"bytes", "sha256"}``."""
    from .io import atomic_save_tensors

    if not isinstance(path, str) or not path.endswith(".safetensors"):
        raise ValueError(f"path must end in .safetensors, got {path!r}")
    spec = check_model_spec(_spec_record(factory, kwargs or {}), f"save_model({path!r})")
    if meta and "model_spec" in meta:
        raise ValueError("meta must not hold 'model_spec' (save_model writes it)")
    return atomic_save_tensors(path, model.state_dict(), {**(meta or {}),
                                                          "model_spec": _spec_record(**spec)})


def read_model_spec(path: str) -> Optional[Dict[str, Any]]:
    """The checked ``{"factory", "kwargs"}`` a weights file records, read from its header alone;
    ``None`` for a weights file without one (plain safetensors, a torch file)."""
    from .io import read_meta

    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"weights {path!r} is not a file")
    if not path.endswith(".safetensors"):
        return None
    where = f"weights file {path!r}"
    meta = read_meta(path, where)
    if not isinstance(meta, dict) or "model_spec" not in meta:
        return None
    return check_model_spec(meta["model_spec"], where)


def load_model(path: str, num_classes: Optional[int] = None, map_location: str = "cpu") -> Tuple[nn.Module, Dict]:
    """``(model, spec)`` rebuilt from a :func:`save_model` file, in eval mode.

    The spec is checked first (:func:`read_model_spec`); the model is then built on the ``meta``
    device and compared with the file's tensor names and shapes (so a small file cannot make
    loading allocate a large model), and only then built and loaded strictly. ``num_classes``,
    when given, must equal the recorded one. ``ValueError`` naming the file otherwise."""
    from .io import header_tensors, load_tensors

    spec = read_model_spec(path)
    where = f"weights file {path!r}"
    if spec is None:
        raise ValueError(f"{where} records no model spec (saved by other code, or not safetensors): give --model "
                         f"(a timm name or package.module:factory) to build the model its weights are for")
    recorded = spec["kwargs"].get("num_classes")
    if num_classes is not None and recorded is not None and num_classes != recorded:
        raise ValueError(f"{where} holds a model of {recorded} classes, not the {num_classes} asked for "
                         f"(--num-classes)")
    header = header_tensors(path, where)
    try:
        with torch.device("meta"):
            probe = _construct(spec)
    except Exception as e:  # noqa: BLE001 - the factory's refusal of the recorded arguments
        raise ValueError(f"{where}: {spec['factory']}(**{spec['kwargs']}) cannot be built "
                         f"({type(e).__name__}: {e})") from None
    _check_tensors(probe.state_dict(), header, where, spec)
    model = _construct(spec)
    tensors, _ = load_tensors(path)
    _check_tensors(model.state_dict(), tensors, where, spec)
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location).eval(), spec


def _check_tensors(own: Dict[str, torch.Tensor], found: Dict[str, torch.Tensor], where: str, spec: Dict) -> None:
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    wrong = [f"{k} {tuple(found[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
             if k in found and (found[k].shape != v.shape or found[k].is_floating_point() != v.is_floating_point())]
    if missing or unexpected or wrong:
        parts = [f"missing tensors {missing[:5]}" if missing else "",
                 f"unexpected tensors {unexpected[:5]}" if unexpected else "",
                 f"mismatched {wrong[:5]}" if wrong else ""]
        raise ValueError(f"{where} does not hold the weights of {spec['factory']}(**{spec['kwargs']}): "
                         + "; ".join(p for p in parts if p))
