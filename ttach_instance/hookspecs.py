"""The pluggy hook specifications of ttach-instance (the only place hooks are declared).

A plugin is a module (or object) with ``@hookimpl`` functions, published under the entry-point
group ``ttach_instance``::

    [project.entry-points.ttach_instance]
    my_plugin = "my_package.tta_plugin"

The built-in spaces and ops are registered through these very hooks.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "ttach_instance"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_spaces(register: Callable[..., None]) -> None:
    """Register transform spaces.

    Call ``register(name, factory, description="")`` once per space; ``factory(**params)``
    returns a :class:`ttach_instance.TransformSpace` and is called lazily, by
    ``ttach_instance.get_space(name, **params)``. Names are letters, digits, ``_ . -``.

    Names are global: a name registered by two plugins is unusable bare (the error names both
    providers) and reachable qualified, ``"<entry-point name>:<name>"``; built-in names are
    reserved (the built-in keeps the name, the plugin gets a warning). Keep the hook cheap and
    free of side effects: it runs whenever the registry is (re)built, must only call
    ``register``, and if it raises, the whole plugin is skipped with a warning.
    """


@hookspec
def register_ops(register: Callable[..., None]) -> None:
    """Register op families.

    Call ``register(name, factory, description="")``; ``factory(**params)`` returns an
    :class:`ttach_instance.ops.Op` (a subclass itself is a fine factory). Same naming rules as
    :func:`register_spaces`. Registered ops can be named in op specs
    (``ttach_instance.make_op("rotate", angle=15)``, ``space_from_specs``).
    """
