"""The plugin manager and the registry: the only way names become spaces and ops.

Plugins are found through the entry-point group ``ttach_instance``. Each entry point is
loaded on its own and each hook implementation is called on its own, so a plugin that fails
to import, or whose hook raises, is reported once as a warning naming it and skipped; the
built-ins and the other plugins keep working.

Environment:
- ``TTACH_INSTANCE_PLUGINS``: unset loads every installed plugin; ``none`` (or empty) loads
  none; ``a,b`` loads only the entry points named ``a`` and ``b``.
- ``TTACH_INSTANCE_DISABLE_PLUGINS``: ``a,b`` skips those entry points.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import pluggy

from . import hookspecs
from .space import TransformSpace

BUILTIN_PLUGIN = "builtin"


class PluginWarning(UserWarning):
    """A third-party plugin could not be loaded or its hook failed; it was skipped."""


@dataclass
class PluginInfo:
    name: str
    package: Optional[str] = None
    version: Optional[str] = None
    module: Optional[str] = None
    spaces: List[str] = field(default_factory=list)
    ops: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


@dataclass
class _Entry:
    name: str
    factory: Callable[..., Any]
    description: str
    provider: str


class Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: Dict[str, PluginInfo] = {}
        self.spaces: Dict[str, _Entry] = {}
        self.ops: Dict[str, _Entry] = {}
        self.clashes: Dict[str, List[str]] = {}
        self.op_clashes: Dict[str, List[str]] = {}
        self._load()

    # -- loading
    def _load(self) -> None:
        from . import spaces as builtin

        self.pm.register(builtin, name=BUILTIN_PLUGIN)
        self.plugins[BUILTIN_PLUGIN] = PluginInfo(
            BUILTIN_PLUGIN, package="ttach-instance", version=_version("ttach-instance"), module=builtin.__name__
        )
        for ep in _selected_entry_points():
            info = PluginInfo(
                ep.name,
                package=ep.dist.name if getattr(ep, "dist", None) else None,
                version=ep.dist.version if getattr(ep, "dist", None) else None,
                module=ep.value,
            )
            self.plugins[ep.name] = info
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must never take the core down
                self._fail(info, f"failed to load: {type(exc).__name__}: {exc}")
        self._collect("register_spaces", self.spaces, self.clashes, "spaces")
        self._collect("register_ops", self.ops, self.op_clashes, "ops")

    def _fail(self, info: PluginInfo, message: str) -> None:
        info.errors.append(message)
        package = f" (package {info.package} {info.version})" if info.package else ""
        warnings.warn(f"ttach-instance plugin {info.name!r}{package} {message}; skipped", PluginWarning, stacklevel=3)

    def _collect(self, hook: str, table: Dict[str, _Entry], clashes: Dict[str, List[str]], kind: str) -> None:
        for impl in getattr(self.pm.hook, hook).get_hookimpls():  # registration order: built-ins first
            provider = impl.plugin_name
            info = self.plugins.get(provider) or self.plugins.setdefault(provider, PluginInfo(provider))
            staged: List[_Entry] = []

            def register(name: str, factory: Callable[..., Any], description: str = "") -> None:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{kind[:-1]} name must be a non-empty string, got {name!r}")
                if not callable(factory):
                    raise TypeError(f"{kind[:-1]} {name!r}: factory must be callable")
                staged.append(_Entry(name, factory, description or "", provider))

            try:
                impl.function(register=register)
            except Exception as exc:
                self._fail(info, f"hook {hook} raised {type(exc).__name__}: {exc}")
                continue
            for entry in staged:
                if entry.name in table and table[entry.name].provider != provider:
                    clashes.setdefault(entry.name, [table[entry.name].provider]).append(provider)
                    continue
                table[entry.name] = entry
                getattr(info, kind).append(entry.name)

    # -- lookup
    def get_space(self, name: str, **params: Any) -> TransformSpace:
        entry = self._lookup(name, self.spaces, self.clashes, "space")
        try:
            space = entry.factory(**params)
        except TypeError as exc:
            raise TypeError(f"space {name!r} (from plugin {entry.provider!r}): bad parameters {params}: {exc}") from exc
        if not isinstance(space, TransformSpace):
            raise TypeError(
                f"space {name!r} from plugin {entry.provider!r} returned {type(space).__name__}, expected TransformSpace"
            )
        space.name = name
        space.params = dict(params)
        space.provider = entry.provider
        return space

    def make_op(self, name: str, **params: Any):
        from .ops import Op

        entry = self._lookup(name, self.ops, self.op_clashes, "op")
        op = entry.factory(**params)
        if not isinstance(op, Op):
            raise TypeError(f"op {name!r} from plugin {entry.provider!r} returned {type(op).__name__}, expected Op")
        return op

    @staticmethod
    def _lookup(name: str, table: Dict[str, _Entry], clashes: Dict[str, List[str]], kind: str) -> _Entry:
        if not isinstance(name, str):
            raise TypeError(f"{kind} name must be a string, got {type(name).__name__}")
        if name in clashes:
            providers = " and ".join(repr(p) for p in clashes[name])
            raise ValueError(
                f"{kind} name {name!r} is registered by more than one plugin: {providers}; "
                f"uninstall or disable one (TTACH_INSTANCE_DISABLE_PLUGINS)"
            )
        if name not in table:
            raise ValueError(f"unknown {kind} {name!r}; available: {sorted(table)}")
        return table[name]


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _selected_entry_points() -> List[Any]:
    allow_env = os.environ.get("TTACH_INSTANCE_PLUGINS")
    deny = {n.strip() for n in os.environ.get("TTACH_INSTANCE_DISABLE_PLUGINS", "").split(",") if n.strip()}
    allow: Optional[set] = None
    if allow_env is not None:
        allow = {n.strip() for n in allow_env.split(",") if n.strip() and n.strip().lower() != "none"}
    seen = set()
    selected = []
    for ep in metadata.entry_points(group=hookspecs.PROJECT):
        if ep.name in seen or ep.name == BUILTIN_PLUGIN:
            continue
        seen.add(ep.name)
        if ep.name in deny or (allow is not None and ep.name not in allow):
            continue
        selected.append(ep)
    return selected


_REGISTRY: Optional[Registry] = None
_LOCK = threading.Lock()


def registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    with _LOCK:
        if _REGISTRY is None:
            _REGISTRY = Registry()
        return _REGISTRY


def reload() -> Registry:
    """Forget and rebuild the registry (after installing a plugin or changing the env vars)."""
    global _REGISTRY
    with _LOCK:
        _REGISTRY = None
    return registry()


def get_space(name: Any, **params: Any) -> TransformSpace:
    """A space by registered name (``get_space("five_crops", crop_size=56)``); a
    :class:`TransformSpace` passes through unchanged."""
    if isinstance(name, TransformSpace):
        if params:
            raise ValueError("parameters can only be given with a space name, not a TransformSpace instance")
        return name
    return registry().get_space(name, **params)


def list_spaces() -> List[str]:
    return sorted(registry().spaces)


def list_ops() -> List[str]:
    return sorted(registry().ops)


def make_op(name: str, **params: Any):
    """An op by registered family name (``make_op("rotate", angle=15)``)."""
    return registry().make_op(name, **params)


def space_from_specs(specs: List[Any], name: str = "custom") -> TransformSpace:
    """Build a space from JSON-able specs: each candidate is an op spec ``{"op": "rotate",
    "angle": 20}`` or a list of them (composition), optionally ``{"name": ..., "ops": [...]}``."""
    from .space import Candidate

    def op_of(spec: Dict[str, Any]):
        if not isinstance(spec, dict) or "op" not in spec:
            raise ValueError(f"an op spec is a dict with an 'op' key, got {spec!r}")
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "op"}
        return make_op(spec["op"], **params)

    cands = []
    for item in specs:
        if isinstance(item, dict) and "ops" in item:
            cands.append(Candidate([op_of(s) for s in item["ops"]], name=item.get("name")))
        elif isinstance(item, list):
            cands.append(Candidate([op_of(s) for s in item]))
        else:
            cands.append(Candidate(op_of(item)))
    return TransformSpace(cands, name=name)


def plugin_infos() -> List[PluginInfo]:
    reg = registry()
    return list(reg.plugins.values())
