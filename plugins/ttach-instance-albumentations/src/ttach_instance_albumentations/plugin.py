"""The ttach-instance entry point of this package (group ``ttach_instance``, name
``albumentations``).

albumentations is imported only when a space or op is built, so listing plugins and loading
the registry stay fast; a missing albumentations fails here, at load, and the registry
reports it as a plugin warning.
"""

from __future__ import annotations

import importlib.util

from ttach_instance.hookspecs import hookimpl

if importlib.util.find_spec("albumentations") is None:
    raise ImportError("ttach-instance-albumentations needs the 'albumentations' package: pip install albumentations")


def albumentations_space(names=None):
    from .ops import albumentations_space as build

    return build(names=names)


def albu_op(transform, name=None, check_deterministic=True):
    from .ops import AlbumentationsOp

    return AlbumentationsOp(transform, name=name, check_deterministic=check_deterministic)


@hookimpl
def register_spaces(register):
    register(
        "albumentations",
        albumentations_space,
        "identity + deterministic albumentations ops (CLAHE, equalize, unsharp mask, sharpen, blurs, gamma); CPU path",
    )


@hookimpl
def register_ops(register):
    register("albu", albu_op, "albu(transform, name=None): one albumentations transform (p=1, fixed params); CPU path")
