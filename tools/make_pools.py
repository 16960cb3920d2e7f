#!/usr/bin/env python
"""Generate the candidate pools of the ``randaugment`` space (GPS's RandAugment pools, as data):
``ttach_instance/pools/randaugment32.json`` for 32-px images (GPS's CIFAR pool) and
``randaugment224.json`` for 64- and 224-px images (GPS's ImageNet pool).

Each pool is the identity (candidate 0) and 100 sub-policies, each the composition of two
(op, magnitude) pairs drawn the way GPS's ``BetterRandAugment`` draws them with ``rand_m``,
``fix_sign`` and ``true_m0`` (bayesgroup/gps-augment, ``utils/randaugment.py`` and
``imagenet/randaugment_imagenet.py``; read, not copied):

* the op is drawn uniformly, with replacement, from GPS's op list (identity included);
* its magnitude ``m`` uniformly from ``[-M, M]`` on RandAugment's 0-30 scale; an op with
  ``|m| < 0.5`` is skipped (``true_m0``: GPS's CIFAR commands set it, its ImageNet ones do not,
  which differs only in those rare draws of the parameterless ops and posterize);
* the value is ``low + |m| / 30 * (high - low)`` with GPS's ``(low, high)`` per op, except for
  the enhancement factors (contrast, colour, brightness, sharpness): ``1 + m / 30 * high``, with
  ``m``'s sign; geometric ops take a random sign (GPS draws it inside the op, per image: here once
  per candidate, so a candidate is one deterministic view).

Where GPS differs between its pools, this follows it: 32 px mixes ``M = 45`` and ``M = 20``
(GPS's CIFAR pool: 500 draws of each), 64/224 px uses ``M = 20`` (its ImageNet pool) and adds
equalize and invert (``solarize(0)``), which only the ImageNet list holds. Translations are a
fraction of the image side in both, as in GPS (``v * IMAGE_SIZE`` pixels).

Left out of GPS's lists: SolarizeAdd and Cutout (no such op here; Cutout's box is random), the
ImageNet pool's random-resized-crop + flip before every sub-policy (random per image), and
autocontrast's cutoff magnitude (the op here is PIL's autocontrast without cutoff). Geometric
ops run on the mirror-expanded canvas (the library's convention; GPS mirrors on CIFAR and fills
black on ImageNet) and shear about the image centre (GPS about the top edge, or the bottom one
for a random half of the images). Values are rounded (2 decimals, whole degrees, whole bits) so names stay
short; enhancement factors below 0.1 are raised to 0.1 (``M = 45`` reaches -0.35: a black or
inverted image), solarize thresholds are GPS's ``T / 255`` and a threshold of 1 or more
(``T >= 255``: next to nothing inverted) drops the op, as does a value that rounds to the op's
identity. A candidate equal to one already drawn (same name) or to the identity (invert twice
included) is drawn again.

Usage: ``python tools/make_pools.py [--out DIR]`` (default: the package's pools folder).
Why a script: the pools ship as data; tests/test_randaugment_ops.py regenerates them and
compares, so the files are exactly what this code writes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Dict, List, Optional

from ttach_instance.ops import BUILTIN_OPS, Op
from ttach_instance.pools import FORMAT, FORMAT_VERSION
from ttach_instance.space import Candidate

SEED = 2002_09103  # GPS's arXiv number
CANDIDATES = 100  # besides the identity
OPS_PER_CANDIDATE = 2
SCALE = 30.0  # RandAugment's magnitude scale

# GPS's op list: (op, kind, low, high). Kinds: "plain" (no magnitude), "geometric" (random sign),
# "factor" (1 + m / 30 * high, signed), "solarize" / "posterize" (low + |m| / 30 * (high - low)).
GPS_CIFAR = [
    ("identity", "plain", 0, 0),
    ("shear_x", "geometric", 0.0, 0.5),
    ("shear_y", "geometric", 0.0, 0.5),
    ("translate_x", "geometric", 0.0, 0.45),
    ("translate_y", "geometric", 0.0, 0.45),
    ("rotate", "geometric", 0.0, 40.0),
    ("autocontrast", "plain", 0, 0),
    ("solarize", "solarize", 256.0, 128.0),
    ("posterize", "posterize", 8.0, 2.0),
    ("contrast", "factor", 0.0, 0.8),
    ("color", "factor", 0.0, 0.9),
    ("brightness", "factor", 0.0, 0.8),
    ("sharpness", "factor", 0.0, 0.9),
]
GPS_IMAGENET = GPS_CIFAR + [("invert", "plain", 0, 0), ("equalize", "plain", 0, 0)]

POOLS = {
    # file: (pool name, image sizes, op list, magnitude bound M per candidate i)
    "randaugment32.json": ("randaugment32", [32], GPS_CIFAR, lambda i: 45.0 if i % 2 == 0 else 20.0),
    "randaugment224.json": ("randaugment224", [64, 224], GPS_IMAGENET, lambda i: 20.0),
}
PARAM = {"shear_x": "shear", "shear_y": "shear", "translate_x": "fraction", "translate_y": "fraction",
         "rotate": "angle", "contrast": "factor", "color": "factor", "brightness": "factor", "sharpness": "factor"}


def make_op(name: str, kind: str, low: float, high: float, m: float, negative: bool) -> Optional[Op]:
    """The op GPS applies for ``name`` at magnitude ``m`` (``None`` when it is the identity)."""
    if abs(m) < 0.5 or name == "identity":
        return None
    if kind == "plain":
        return BUILTIN_OPS["solarize"](0.0) if name == "invert" else BUILTIN_OPS[name]()
    value = low + abs(m) / SCALE * (high - low)
    if kind == "geometric":
        value = float(round(value)) if name == "rotate" else round(value, 2)
        value = -value if negative else value
        return BUILTIN_OPS[name](value) if value != 0 else None
    if kind == "factor":
        value = max(round(1 + m / SCALE * high, 2), 0.1)
        return BUILTIN_OPS[name](value) if value != 1 else None
    if kind == "solarize":
        threshold = round(value / 255, 2)
        return BUILTIN_OPS["solarize"](threshold) if threshold < 1 else None
    if kind == "posterize":
        bits = max(int(value), 1)  # GPS: int(v), truncated
        return BUILTIN_OPS["posterize"](bits) if bits < 8 else None
    raise ValueError(f"unknown kind {kind!r}")


def make_pool(file: str) -> Dict:
    """The pool written to ``file``, as a JSON-able dict (deterministic: seeded per file)."""
    name, sizes, table, bound = POOLS[file]
    rng = random.Random(f"{SEED}:{name}")
    candidates: List[Candidate] = [Candidate()]
    names = {"identity"}
    while len(candidates) < CANDIDATES + 1:
        big_m = bound(len(candidates) - 1)
        ops = []
        for _ in range(OPS_PER_CANDIDATE):
            # Three draws per op whatever it is, so one op's kind never shifts the others' draws.
            pick, u, sign = rng.random(), rng.random(), rng.random()
            op_name, kind, low, high = table[int(pick * len(table))]
            op = make_op(op_name, kind, low, high, big_m * (2 * u - 1), sign < 0.5)
            if op is not None:
                ops.append(op)
        if len(ops) == 2 and ops[0] == ops[1] == BUILTIN_OPS["solarize"](0.0):
            ops = []  # invert twice: the identity
        cand = Candidate(ops)
        if cand.name not in names:
            names.add(cand.name)
            candidates.append(cand)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "image_sizes": sizes,
        "generator": "tools/make_pools.py",
        "seed": SEED,
        "source": "GPS (Molchanov et al., UAI 2020) RandAugment pools, bayesgroup/gps-augment: "
                  + ("CIFAR list, M = 45 and 20 alternating" if sizes == [32] else "ImageNet list, M = 20"),
        "candidates": [c.spec() for c in candidates],
    }


def render(pool: Dict) -> str:
    """The file's text: one candidate per line (diffs stay readable)."""
    head = {k: v for k, v in pool.items() if k != "candidates"}
    lines = [json.dumps(c, sort_keys=True) for c in pool["candidates"]]
    body = json.dumps(head, indent=1, sort_keys=True)[:-2]
    return body + ',\n "candidates": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "ttach_instance" / "pools",
                        help="folder to write the pools to (default: the package's)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for file in POOLS:
        (args.out / file).write_text(render(make_pool(file)), encoding="utf-8")
        print(f"wrote {args.out / file}")


if __name__ == "__main__":
    main()
