"""Fit recipes as data: one JSON file per published predictor (``ttach-instance fit --recipe``).

A recipe (``kind`` ``ttach_instance.fit_recipe``, ``format_version`` 1) holds a ``predictor``
section (``architecture``, ``width``, ``backbone``, ``input_size``, ``pretrained``,
``init_from``: ``"target"`` or ``null``) and a ``fit`` section (the fields of
:class:`~ttach_instance.training.trainer.FitConfig`, with ``flip`` a bool for the space's own
flip permutation and ``tau`` a number, ``"auto"`` or ``null``), plus ``description``,
``result`` (where the published number is) and optional ``label_caches`` (the caches it was
fitted on, for the research scripts). Every field is checked (type, bounds, choices); a
broken file is a ``ValueError`` naming it and the field.

The CLI resolves a fit's settings in three layers: the built-in defaults (today's ``fit``
defaults), then the recipe, then the flags given on the command line -- a flag always wins.
``auto`` is a recipe computed from the labels (:func:`auto_recipe`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from typing import Any, Dict, List, Optional, Tuple

from ..predictors.base import MAX_SIDE, Field

__all__ = ["RECIPE_KIND", "RECIPE_FORMAT", "list_recipes", "load_recipe", "check_recipe", "defaults",
           "resolve", "auto_recipe", "fit_config"]

RECIPE_KIND = "ttach_instance.fit_recipe"
RECIPE_FORMAT = 1
_HERE = os.path.dirname(os.path.abspath(__file__))
_BIG = 1e6

_BOOL, _TARGET = "bool", "target"
#: section -> key -> a Field, a tuple of allowed values, or "bool"; ``None`` allowed where marked.
SCHEMA: Dict[str, Dict[str, Any]] = {
    "predictor": {
        "architecture": ("timm", "small"),
        "width": Field("int", 1, 512),
        "backbone": Field("str", optional=True),
        "input_size": Field("int", 8, MAX_SIDE, optional=True),
        "pretrained": _BOOL,
        "init_from": (None, _TARGET),
    },
    "fit": {
        "epochs": Field("int", 1, 100_000),
        "batch_size": Field("int", 1, 1 << 20),
        "optimizer": ("rmsprop", "adamw", "sgd"),
        "lr": Field("float", 1e-12, 10.0),
        "weight_decay": Field("float", 0.0, 10.0),
        "warmup_steps": Field("int", 0, 10 ** 9),
        "ema_decay": Field("float", 0.0, 0.999999),
        "listwise_weight": Field("float", 0.0, _BIG),
        "spearman_weight": Field("float", 0.0, _BIG),
        "tau": Field("float", 1e-9, _BIG, optional=True),  # or "auto"
        "rank_temperature": Field("float", 1e-9, _BIG),
        "val_fraction": Field("float", 0.0, 0.99),
        "cutout": Field("float", 0.0, 1.0),
        "seed": Field("int", 0, 2 ** 32 - 1),
        "grad_clip": Field("float", 0.0, _BIG),
        "flip": _BOOL,
        "group_weight": Field("float", 0.0, _BIG),
        "distill_weight": Field("float", 0.0, _BIG),
        "clean_tolerance": Field("float", 0.0, 100.0, optional=True),
        "identity_gate": _BOOL,
        "select_by": (None, "spearman", "k1_accuracy", "top1_hit", "regret"),
        "patience": Field("int", 1, 100_000, optional=True),
    },
}
_TOP = {"kind", "format_version", "name", "description", "result", "label_caches", "predictor", "fit"}


def defaults() -> Dict[str, Dict[str, Any]]:
    """The built-in settings (what ``fit`` does without a recipe or flags)."""
    from ..training.trainer import FitConfig

    fit = {k: v for k, v in asdict(FitConfig()).items() if k != "flip_permutation"}
    fit.update(flip=False, tau=None)  # tau None: 1 for classification labels, auto for segmentation
    return {"predictor": {"architecture": "timm", "width": 8, "backbone": None, "input_size": None,
                          "pretrained": False, "init_from": None}, "fit": fit}


def _check_value(spec: Any, name: str, value: Any, where: str) -> Any:
    if spec == _BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if isinstance(spec, tuple):
        if value not in spec or isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be one of {list(spec)}, got {value!r}")
        return value
    if name == "fit.tau" and value == "auto":
        return value
    return spec.validate(name, value, where)


def check_recipe(doc: Any, where: str) -> Dict[str, Any]:
    """``doc`` validated: kind, format version, known sections and keys, every value's type and
    bounds. Returns it (values normalised); ``ValueError`` naming ``where`` and the field."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: a recipe must be a JSON object, got {type(doc).__name__}")
    if doc.get("kind") != RECIPE_KIND:
        raise ValueError(f"{where}: kind must be {RECIPE_KIND!r}, got {doc.get('kind')!r}")
    if type(doc.get("format_version")) is not int or doc["format_version"] != RECIPE_FORMAT:
        raise ValueError(f"{where}: format_version is {doc.get('format_version')!r}; this ttach-instance reads "
                         f"recipe version {RECIPE_FORMAT} only")
    unknown = sorted(set(doc) - _TOP)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown} (a recipe has {sorted(_TOP)})")
    for key in ("name", "description", "result"):
        if key in doc and not isinstance(doc[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {doc[key]!r}")
    caches = doc.get("label_caches", [])
    if not isinstance(caches, list) or not all(isinstance(c, str) for c in caches):
        raise ValueError(f"{where}: label_caches must be a list of directory names, got {caches!r}")
    out = dict(doc)
    for section, schema in SCHEMA.items():
        values = doc.get(section, {})
        if not isinstance(values, dict):
            raise ValueError(f"{where}: {section} must be a JSON object, got {type(values).__name__}")
        unknown = sorted(set(values) - set(schema))
        if unknown:
            raise ValueError(f"{where}: unknown {section} fields {unknown} (known: {sorted(schema)})")
        out[section] = {k: _check_value(schema[k], f"{section}.{k}", v, where) for k, v in values.items()}
    return out


def list_recipes() -> List[str]:
    """The names of the recipes shipped with the package (``ttach_instance/recipes/NAME.json``)."""
    return sorted(f[:-5] for f in os.listdir(_HERE) if f.endswith(".json"))


def load_recipe(name_or_path: str) -> Dict[str, Any]:
    """A shipped recipe by name, or a recipe file (a path ending in ``.json``), checked."""
    if name_or_path.endswith(".json") or os.sep in name_or_path:
        path = name_or_path
        if not os.path.isfile(path):
            raise ValueError(f"recipe file {path!r} does not exist")
    else:
        if name_or_path not in list_recipes():
            raise ValueError(f"unknown recipe {name_or_path!r}; known: {', '.join(list_recipes() + ['auto'])} "
                             f"(or a path to a recipe .json file)")
        path = os.path.join(_HERE, name_or_path + ".json")
    where = f"recipe {path!r}"
    try:
        with open(path) as f:
            doc = json.load(f)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    recipe = check_recipe(doc, where)
    recipe.setdefault("name", os.path.basename(path)[:-5])
    return recipe


def resolve(recipe: Optional[Dict[str, Any]], explicit: Dict[Tuple[str, str], Any]
            ) -> Tuple[Dict[str, Dict[str, Any]], Dict[Tuple[str, str], str]]:
    """``(settings, sources)``: :func:`defaults`, overridden by ``recipe``'s sections, overridden
    by ``explicit`` (``{(section, key): value}``, the flags given). ``sources[(section, key)]``
    is ``"default"``, ``"recipe"`` or ``"flag"``."""
    settings = defaults()
    sources = {(s, k): "default" for s, values in settings.items() for k in values}
    for section in settings:
        for key, value in (recipe or {}).get(section, {}).items():
            settings[section][key], sources[(section, key)] = value, "recipe"
    for (section, key), value in explicit.items():
        settings[section][key], sources[(section, key)] = value, "flag"
    return settings, sources


def fit_config(settings: Dict[str, Any], space, tau: float):
    """The :class:`FitConfig` of a resolved ``fit`` section (``flip``: the space's permutation)."""
    from ..training.trainer import FitConfig, flip_permutation

    names = {f.name for f in fields(FitConfig)}
    values = {k: v for k, v in settings.items() if k in names}
    values.update(tau=tau, flip_permutation=flip_permutation(space) if settings["flip"] else None)
    return FitConfig(**values)


def auto_recipe(manifest: Dict[str, Any], data: Dict[str, Any], target_width: Optional[int] = None,
                has_target_weights: bool = False) -> Dict[str, Any]:
    """The ``auto`` recipe for these labels: the small predictor. A ``SmallResNet`` target (the
    label cache's ``model``) gives it its width (``target_width``, else the labels' recorded width),
    3/4 of the labels' side (multiple of 8, 16..64: the Tiny ImageNet recipe's 24 px at 32; at the
    full side the predictor would cost what the target does) and, when its weights are given, its
    layers to start from. Any other target gets width 16 from scratch at the labels' own side (at
    most 64): on a timm resnet18 at 32 px it costs a third of the target (12.5 vs 37 M-MAC) and
    the full resolution ranked better than 24 px (docs/BENCHMARKS.md, "Second target"). Flip
    augmentation, the published small recipe's optimiser and auxiliary terms (distillation when
    the labels hold the target's logits), at most 30 epochs ended by early stopping on the
    held-out fold's k=1 accuracy, what the wrapper is judged by (patience 10: that 0/1 metric
    plateaus for epochs; the best epoch kept), and identity calibration (classification: clean
    tolerance 0.1 points with the gate; segmentation: 0, no gate)."""
    model = manifest.get("model") or {}
    spec = model.get("spec") or {}
    side = int(manifest["size"]) if manifest.get("size") else int(data["images"].shape[-1])
    segmentation = (manifest.get("task") or {}).get("name") == "segmentation"
    small = model.get("class") == "ttach_instance.models.SmallResNet" or \
        spec.get("model") == "ttach_instance.models:small_resnet"
    fit: Dict[str, Any] = {"epochs": 30, "patience": 10, "select_by": "k1_accuracy", "flip": True,
                           "clean_tolerance": 0.0 if segmentation else 0.1, "identity_gate": not segmentation}
    width = (target_width or (spec.get("kwargs") or {}).get("width") or 16) if small else 16
    predictor = {"architecture": "small", "width": int(width),
                 "input_size": min(side, max(16, min(64, 8 * round(0.75 * side / 8)))) if small else min(side, 64),
                 "init_from": _TARGET if small and has_target_weights else None}
    fit.update(optimizer="adamw", lr=3e-3, weight_decay=0.05, ema_decay=0.995, spearman_weight=2.0,
               group_weight=0.0 if segmentation else 1.0,
               distill_weight=1.0 if "input_logits" in data else 0.0)
    doc = {"kind": RECIPE_KIND, "format_version": RECIPE_FORMAT, "name": "auto",
           "description": f"auto: target {model.get('class')!r} -> {predictor['architecture']} predictor",
           "predictor": predictor, "fit": fit}
    return check_recipe(doc, "recipe 'auto'")


def describe(name: str, settings: Dict[str, Dict[str, Any]], sources: Dict[Tuple[str, str], str]) -> str:
    """The resolved recipe as lines ``section.key = value  (source)``, non-defaults first."""
    rows = sorted(sources, key=lambda sk: (sources[sk] == "default", sk))
    lines = [f"resolved recipe ({name}):"]
    for section, key in rows:
        lines.append(f"  {section}.{key} = {json.dumps(settings[section][key])}  ({sources[(section, key)]})")
    return "\n".join(lines)
