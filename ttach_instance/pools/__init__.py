"""Candidate pools shipped as data: GPS's RandAugment-style sub-policies (the ``randaugment``
space), written by ``tools/make_pools.py`` and read with :mod:`importlib.resources`.

A pool file is JSON: ``format`` (``"ttach_instance.pool"``), ``format_version``, ``name``,
``image_sizes`` and ``candidates`` (each ``{"name": ..., "ops": [op specs]}``, the identity first).
Only built-in ops are allowed in it: a pool is data, never a way to run a plugin's code.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Dict

from ..ops import BUILTIN_OPS, HFlip
from ..space import Candidate, TransformSpace

FORMAT = "ttach_instance.pool"
FORMAT_VERSION = 1
#: Image side -> pool file (the 224-px pool serves 64 px too: translations are fractions).
POOL_FILES = {32: "randaugment32.json", 64: "randaugment224.json", 224: "randaugment224.json"}


def randaugment(size: int = 224, flip: bool = False) -> TransformSpace:
    """GPS's RandAugment pool for ``size``-px images (32, 64 or 224): the identity and 100
    compositions of two (op, magnitude) pairs; 32 px follows GPS's CIFAR pool, 64/224 its
    ImageNet pool (``tools/make_pools.py`` says how they are drawn). ``flip``: each candidate
    also followed by a horizontal flip (202), as GPS's pools apply the training flip before each
    sub-policy; a model trained with flips gains most from them."""
    if type(size) is not int or size not in POOL_FILES:
        raise ValueError(f"randaugment: size must be 32, 64 or 224 (the image side the pool is drawn for), got {size!r}")
    if type(flip) is not bool:
        raise ValueError(f"randaugment: flip must be true or false, got {flip!r}")
    file = POOL_FILES[size]
    text = resources.files(__name__).joinpath(file).read_text(encoding="utf-8")
    space = pool_space(json.loads(text), file)
    if flip:
        flips = TransformSpace([Candidate(), Candidate(HFlip())], name="hflip")
        space = space.product(flips, name=space.name)
    return space


def pool_space(data: Dict[str, Any], where: str = "pool") -> TransformSpace:
    """The space a pool file describes; a file of another format or version is refused."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{where}: not a ttach_instance pool file (format {FORMAT!r} expected)")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: pool format version {data.get('format_version')!r} is not supported "
                         f"(this version reads {FORMAT_VERSION}); regenerate it with tools/make_pools.py")
    cands = []
    for i, item in enumerate(data.get("candidates") or []):
        ops = []
        for spec in item.get("ops", []):
            family = spec.get("op")
            if family not in BUILTIN_OPS:
                raise ValueError(f"{where}: candidate {i} uses {family!r}, which is not a built-in op")
            ops.append(BUILTIN_OPS[family](**{k: v for k, v in spec.items() if k != "op"}))
        cand = Candidate(ops, name=item.get("name"))
        if cand.name != Candidate(ops).name:
            raise ValueError(f"{where}: candidate {i} is named {cand.name!r} but its ops make {Candidate(ops).name!r}")
        cands.append(cand)
    if not cands:
        raise ValueError(f"{where}: the pool holds no candidates")
    return TransformSpace(cands, name=str(data.get("name", "pool")))
