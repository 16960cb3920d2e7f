"""The plugin manager and the registry: the only way names become spaces and ops.

Plugins are found through the entry-point group ``ttach_instance``; the built-in spaces and ops
are a plugin too, :mod:`ttach_instance.builtin_spaces`, published by the ttach-instance
distribution itself under the reserved entry-point name ``builtin`` (pyproject.toml). It is
loaded first, whatever the environment variables say. Where the installed metadata lacks that
entry point (a source checkout run without ``pip install -e .``, or installed before the entry
point existed) the same module is loaded by the same name and ``Registry.builtin_source`` says
``"fallback"``: stale metadata must not leave the core without its spaces. Each entry point is
loaded on its own and each hook implementation is called on its own, so a plugin that fails
to import, or whose hook raises, is reported once as a :class:`PluginWarning` naming it and
skipped as a whole (none of its spaces or ops are kept); the built-ins and the other plugins
keep working.

Names:
- A space (or op) name registered by two third-party plugins is a *clash*: the bare name
  raises a ``ValueError`` naming both providers; each stays reachable by its qualified name
  ``"<plugin>:<name>"`` (``get_space("good:toy")``).
- Built-in names are reserved: a plugin that registers ``paper12`` gets a warning naming
  both providers and the built-in keeps the name (``builtin:paper12`` also works).

Environment (entry-point names or distribution names, comma separated):
- ``TTACH_INSTANCE_PLUGINS``: unset loads every installed plugin; ``none`` (or empty) loads
  none; ``a,b`` loads only those.
- ``TTACH_INSTANCE_DISABLE_PLUGINS``: ``a,b`` skips those.
The built-ins are always loaded. Call :func:`reload` after changing these or installing.

Space references (:func:`get_space`, and so every ``--space`` of the CLI and every wrapper's
``space=``): a registered name (``"paper12"``, ``"plugin:name"``), a name with parameters
after a colon, ``"five_crops:crop_size=0.8"`` (``key=value`` pairs separated by commas; a value
is read as JSON when it parses, ``[56, 48]``, ``true``, ``"text"``, else as a string), or the
path of a policy file written by ``ttach-instance search`` (``"runs/gps.json"``, optionally
``"runs/gps.json:n=4"`` for its first four candidates): that is the built-in space ``policy``,
``get_space("policy", path=..., n=...)``, :mod:`ttach_instance.policy`.

Warnings are emitted after the registry is built and point at the first caller outside this
package; turning :class:`PluginWarning` into an error (``-W error``) makes that first call
raise, but the registry stays built and later calls work.
"""

from __future__ import annotations

import difflib
import importlib.metadata as metadata
import inspect
import os
import re
import sys
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pluggy

from . import hookspecs
from .space import TransformSpace

BUILTIN_PLUGIN = "builtin"
#: The distribution whose ``builtin`` entry point provides the built-in spaces and ops, and that module.
CORE_DISTRIBUTION = "ttach-instance"
BUILTIN_MODULE = "ttach_instance.builtin_spaces"
HOOKS = ("register_spaces", "register_ops")
_KIND = {"register_spaces": "space", "register_ops": "op"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class PluginWarning(UserWarning):
    """A plugin could not be loaded, its hook failed, or its names clash; it (or the name) was skipped."""


@dataclass
class PluginInfo:
    """What ``ttach-instance plugins`` shows for one plugin (an entry point, or the built-ins)."""

    name: str
    package: Optional[str] = None
    version: Optional[str] = None
    module: Optional[str] = None
    #: ``ok``, ``error`` (failed to load or a hook raised: skipped) or ``disabled`` (by env var).
    status: str = "ok"
    spaces: List[str] = field(default_factory=list)
    ops: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        pkg = f" (package {self.package} {self.version or '?'})" if self.package else ""
        return f"{self.name!r}{pkg}"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class _Entry:
    name: str
    factory: Callable[..., Any]
    description: str
    provider: str


class _PluginFailure(Exception):
    pass


class Registry:
    """Loads the built-ins and the selected entry points and collects their spaces and ops.

    ``spaces`` / ``ops`` map every name usable with :meth:`get_space` / :meth:`make_op`
    (bare names, plus qualified names of clashed ones) to their entry; ``clashes`` /
    ``op_clashes`` map a clashed bare name to its providers, in load order.
    """

    def __init__(self, emit_warnings: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: Dict[str, PluginInfo] = {}
        self.spaces: Dict[str, _Entry] = {}
        self.ops: Dict[str, _Entry] = {}
        self.clashes: Dict[str, List[str]] = {}
        self.op_clashes: Dict[str, List[str]] = {}
        self._qualified: Dict[str, Dict[Tuple[str, str], _Entry]] = {"space": {}, "op": {}}
        #: Every load problem, one message each; emitted as PluginWarning.
        self.warnings: List[str] = []
        #: Problems that belong to no single plugin (env vars naming nothing installed, ...).
        self.problems: List[str] = []
        self._order: List[Tuple[str, Any]] = []  # (plugin name, plugin object) in load order
        self._load()
        if emit_warnings:
            self.emit_warnings()

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        entry_points = _entry_points()
        core = _core_entry_point(entry_points)
        #: ``"entry point"`` when the built-ins came from the installed ttach-instance
        #: distribution's own entry point, ``"fallback"`` when its metadata lacks it (a source
        #: checkout not re-installed since the entry point was added, or no install at all).
        self.builtin_source = "fallback" if core is None else "entry point"
        if core is None:
            core = metadata.EntryPoint(BUILTIN_PLUGIN, BUILTIN_MODULE, hookspecs.PROJECT)
        builtin = core.load()  # no try: without its built-ins the core is broken, not a plugin
        self.pm.register(builtin, name=BUILTIN_PLUGIN)
        self._order.append((BUILTIN_PLUGIN, builtin))
        self.plugins[BUILTIN_PLUGIN] = PluginInfo(
            BUILTIN_PLUGIN, package=CORE_DISTRIBUTION, version=_version(CORE_DISTRIBUTION), module=core.value
        )
        for ep, reason in _discover(self.problems, entry_points):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                ep.name,
                package=dist.name if dist is not None else None,
                version=dist.version if dist is not None else None,
                module=ep.value,
            )
            key = ep.name
            if key in self.plugins:  # two distributions publish one entry-point name
                first = self.plugins[key]
                key = f"{ep.name}@{info.package}"
                info.name = key
                self.plugins[key] = info
                self._fail(info, f"uses the entry-point name {ep.name!r} already taken by {first.label}")
                continue
            self.plugins[key] = info
            if reason:
                info.status = "disabled"
                info.errors.append(reason)
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must never take the core down
                self._fail(info, f"failed to load: {type(exc).__name__}: {exc}")
                continue
            unknown = sorted(
                {hc.name for hc in (self.pm.get_hookcallers(plugin) or []) if not hc.has_spec()}
            )
            if unknown:
                self.pm.unregister(plugin)
                self._fail(info, f"implements unknown hook(s) {unknown}; known hooks: {list(HOOKS)}")
                continue
            self._order.append((ep.name, plugin))
        self._collect()
        self.warnings.extend(f"ttach-instance plugins: {p}" for p in self.problems)

    def _fail(self, info: PluginInfo, message: str) -> None:
        info.status = "error"
        info.errors.append(message)
        self.warnings.append(f"ttach-instance plugin {info.label} {message}; skipped")

    def _call_hooks(self, plugin_name: str, plugin: Any) -> Dict[str, List[_Entry]]:
        """Run one plugin's hooks; all its entries or, on any failure, :class:`_PluginFailure`."""
        staged: Dict[str, List[_Entry]] = {"space": [], "op": []}
        for hook in HOOKS:
            kind = _KIND[hook]
            impls = [impl for impl in getattr(self.pm.hook, hook).get_hookimpls() if impl.plugin is plugin]
            for impl in impls:
                if impl.hookwrapper or impl.wrapper:
                    raise _PluginFailure(f"hook {hook} is a wrapper; ttach-instance hooks must be plain functions")

                register = _registrar(staged[kind], kind, plugin_name)
                try:
                    impl.function(register=register)
                except Exception as exc:
                    raise _PluginFailure(f"hook {hook} raised {type(exc).__name__}: {exc}") from exc
        return staged

    def _collect(self) -> None:
        # Our own load order (built-ins first, then entry points by name), not pluggy's
        # call order, which tryfirst/trylast markers would change.
        accepted: List[Tuple[str, Dict[str, List[_Entry]]]] = []
        for name, plugin in self._order:
            try:
                accepted.append((name, self._call_hooks(name, plugin)))
            except _PluginFailure as exc:
                self.pm.unregister(plugin)
                self._fail(self.plugins[name], str(exc))
        tables = {"space": (self.spaces, self.clashes), "op": (self.ops, self.op_clashes)}
        providers: Dict[Tuple[str, str], List[str]] = {}
        for name, staged in accepted:
            info = self.plugins[name]
            for kind, entries in staged.items():
                for entry in entries:
                    owners = providers.setdefault((kind, entry.name), [])
                    if owners and owners[0] == BUILTIN_PLUGIN:
                        builtin = self.plugins[BUILTIN_PLUGIN]
                        self.warnings.append(
                            f"ttach-instance plugin {info.label} registers {kind} {entry.name!r}, a name "
                            f"reserved by {builtin.label}; the built-in keeps it and the plugin's "
                            f"{kind} is ignored"
                        )
                        info.errors.append(f"{kind} {entry.name!r} clashes with the built-in; ignored")
                        continue
                    owners.append(name)
                    self._qualified[kind][(name, entry.name)] = entry
                    getattr(info, kind + "s").append(entry.name)
        for (kind, bare), owners in providers.items():
            table, clashes = tables[kind]
            if len(owners) == 1:
                table[bare] = self._qualified[kind][(owners[0], bare)]
                continue
            clashes[bare] = list(owners)
            for owner in owners:
                table[f"{owner}:{bare}"] = self._qualified[kind][(owner, bare)]
            labels = " and ".join(self.plugins[o].label for o in owners)
            self.warnings.append(
                f"ttach-instance {kind} name {bare!r} is registered by {labels}; the bare name is "
                f"unusable, use one of {[f'{o}:{bare}' for o in owners]} or disable a plugin "
                f"(TTACH_INSTANCE_DISABLE_PLUGINS)"
            )

    def emit_warnings(self) -> None:
        """Emit the collected load problems as :class:`PluginWarning` (one per problem)."""
        for message in self.warnings:
            warnings.warn(message, PluginWarning, stacklevel=_outside_stacklevel())

    # ------------------------------------------------------------------ lookup
    def get_space(self, name: str, /, **params: Any) -> TransformSpace:
        entry = self._lookup(name, "space")
        space = _build(entry, name, params, "space")
        if not isinstance(space, TransformSpace):
            raise TypeError(
                f"space {name!r} from plugin {entry.provider!r} returned {type(space).__name__}, expected TransformSpace"
            )
        bare_ok = self.spaces.get(entry.name) is entry
        space.name = entry.name if bare_ok else f"{entry.provider}:{entry.name}"
        space.params = dict(params)
        space.provider = entry.provider
        return space

    def make_op(self, name: str, /, **params: Any):
        from .ops import Op

        entry = self._lookup(name, "op")
        op = _build(entry, name, params, "op")
        if not isinstance(op, Op):
            raise TypeError(f"op {name!r} from plugin {entry.provider!r} returned {type(op).__name__}, expected Op")
        return op

    def _lookup(self, name: str, kind: str) -> _Entry:
        table, clashes = (self.spaces, self.clashes) if kind == "space" else (self.ops, self.op_clashes)
        if not isinstance(name, str):
            raise TypeError(f"{kind} name must be a string, got {type(name).__name__}")
        if name in clashes:
            labels = " and ".join(self.plugins[p].label for p in clashes[name])
            qualified = [f"{p}:{name}" for p in clashes[name]]
            raise ValueError(
                f"{kind} name {name!r} is registered by more than one plugin: {labels}; "
                f"use a qualified name ({' or '.join(repr(q) for q in qualified)}) or disable one "
                f"(TTACH_INSTANCE_DISABLE_PLUGINS)"
            )
        if name in table:
            return table[name]
        if ":" in name:
            provider, _, bare = name.partition(":")
            entry = self._qualified[kind].get((provider, bare))
            if entry is not None:
                return entry
        available = sorted(table)
        close = difflib.get_close_matches(name, available, n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown {kind} {name!r}{hint}; available {kind}s: {available}")


def _registrar(staged: List[_Entry], kind: str, provider: str) -> Callable[..., None]:
    """The ``register`` callable handed to one plugin's hook for one kind."""

    def register(name: str, factory: Callable[..., Any], description: str = "") -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"{kind} name must be a non-empty string of letters, digits, '_', '.', '-' "
                f"(no ':' or spaces), got {name!r}"
            )
        if not callable(factory):
            raise TypeError(f"{kind} {name!r}: factory must be callable, got {type(factory).__name__}")
        if not isinstance(description, str):
            raise TypeError(f"{kind} {name!r}: description must be a string, got {type(description).__name__}")
        if any(e.name == name for e in staged):
            raise ValueError(f"{kind} {name!r} registered twice by the same plugin")
        staged.append(_Entry(name, factory, description, provider))

    return register


def _build(entry: _Entry, name: str, params: Dict[str, Any], kind: str) -> Any:
    try:
        signature = inspect.signature(entry.factory)
    except (TypeError, ValueError):  # some builtins have no signature
        signature = None
    if signature is not None:
        try:
            signature.bind(**params)
        except TypeError as exc:
            raise TypeError(
                f"{kind} {name!r} (from plugin {entry.provider!r}) got bad parameters {sorted(params)}: {exc}; "
                f"it accepts {signature.replace(return_annotation=inspect.Signature.empty)}"
            ) from None
    try:
        return entry.factory(**params)
    except Exception as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(f"while building {kind} {name!r} from plugin {entry.provider!r} with {params}")
        raise


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).strip().lower()


def _env_names(var: str) -> Optional[set]:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {_norm(n) for n in raw.split(",") if n.strip() and n.strip().lower() != "none"}


def _entry_points() -> List[Any]:
    """The group's entry points sorted by name (a stable sort: one name's entry points keep
    sys.path order), so load order, and the order of providers in clash messages, is the same
    on every machine."""
    eps = metadata.entry_points()
    found = eps.select(group=hookspecs.PROJECT) if hasattr(eps, "select") else eps.get(hookspecs.PROJECT, [])
    return sorted(found, key=lambda ep: ep.name)


def _is_core(ep: Any) -> bool:
    """Whether ``ep`` is ttach-instance's own ``builtin`` entry point (pointing at :data:`BUILTIN_MODULE`)."""
    dist = getattr(ep, "dist", None)
    return (ep.name == BUILTIN_PLUGIN and ep.value == BUILTIN_MODULE and dist is not None
            and _norm(dist.name) == CORE_DISTRIBUTION)


def _core_entry_point(entry_points: Sequence[Any]) -> Optional[Any]:
    """The core's own entry point among ``entry_points``, or ``None`` when the installed metadata
    lacks it (then :meth:`Registry._load` loads :data:`BUILTIN_MODULE` by the same name)."""
    return next((ep for ep in entry_points if _is_core(ep)), None)


def _discover(problems: List[str], entry_points: Optional[Sequence[Any]] = None) -> List[Tuple[Any, Optional[str]]]:
    """Every installed entry point of the group but the core's own, each with ``None`` (load it)
    or the reason it is disabled. Unknown names in the env vars are reported in ``problems``."""
    allow = _env_names("TTACH_INSTANCE_PLUGINS")
    deny = _env_names("TTACH_INSTANCE_DISABLE_PLUGINS") or set()
    found: List[Tuple[Any, Optional[str]]] = []
    seen = set()
    known = set()
    for ep in _entry_points() if entry_points is None else entry_points:
        dist = getattr(ep, "dist", None)
        ids = {_norm(ep.name)} | ({_norm(dist.name)} if dist is not None else set())
        if _is_core(ep):
            continue
        known |= ids
        if (ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        if ep.name == BUILTIN_PLUGIN:
            problems.append(f"entry point {ep.name!r} ({ep.value}) uses the reserved name 'builtin'; skipped")
            continue
        if ids & deny:
            found.append((ep, "disabled by TTACH_INSTANCE_DISABLE_PLUGINS"))
        elif allow is not None and not ids & allow:
            found.append((ep, "not in TTACH_INSTANCE_PLUGINS"))
        else:
            found.append((ep, None))
    for var, names in (("TTACH_INSTANCE_PLUGINS", allow or set()), ("TTACH_INSTANCE_DISABLE_PLUGINS", deny)):
        for missing in sorted(names - known - {BUILTIN_PLUGIN}):
            problems.append(f"{var} names {missing!r}, which is not an installed ttach-instance plugin")
    return found


def _outside_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from the caller of this function that points
    at the first frame outside the ttach_instance package (the user's call)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    frame = sys._getframe(1)  # the function calling warnings.warn: stacklevel 1
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir + os.sep):
        frame = frame.f_back
        level += 1
    return level


_REGISTRY: Optional[Registry] = None
_LOCK = threading.RLock()
_BUILDER: Optional[int] = None  # id of the thread building a registry, while it does


def _check_not_building() -> None:
    if _BUILDER is not None and _BUILDER == threading.get_ident():
        raise RuntimeError(
            "the ttach-instance registry was used from inside a plugin (at import or in a hook) while it is "
            "being built; hooks may only call register(...), factories run later"
        )


def _build_registry() -> Registry:
    global _REGISTRY, _BUILDER
    with _LOCK:
        _check_not_building()
        _BUILDER = threading.get_ident()
        try:
            reg = Registry(emit_warnings=False)
        finally:
            _BUILDER = None
        _REGISTRY = reg
    reg.emit_warnings()
    return reg


def registry() -> Registry:
    """The process-wide registry, built on first use (thread-safe: one thread builds, the others
    wait for it)."""
    _check_not_building()
    reg = _REGISTRY
    if reg is not None:
        return reg
    with _LOCK:
        if _REGISTRY is not None:
            return _REGISTRY
        return _build_registry()


def reload() -> Registry:
    """Rebuild the registry (after installing a plugin or changing the env vars). Readers keep
    the old registry until the new one is complete."""
    return _build_registry()


def get_space(name: Any, /, **params: Any) -> TransformSpace:
    """A space from a reference: a registered name (``get_space("five_crops", crop_size=56)``,
    ``"plugin:name"``), a name with parameters (``"five_crops:crop_size=56"``) or a policy file's
    path (``"runs/gps.json"``, ``"runs/gps.json:n=4"``, an ``os.PathLike``); see the module
    docstring. A :class:`TransformSpace` passes through unchanged. This is the one place a
    reference is resolved: the CLI, the wrappers and checkpoint loading all come here."""
    if isinstance(name, TransformSpace):
        if params:
            raise ValueError("parameters can only be given with a space name, not a TransformSpace instance")
        return name
    name, params = parse_space_reference(name, params)
    return registry().get_space(name, **params)


def space_record(space: TransformSpace) -> Dict[str, Any]:
    """How files record a space so that :func:`space_from_record` rebuilds it: ``{"space": its
    registered name, "space_params": the parameters get_space took}`` (JSON; a policy file's
    path is absolute). The space's fingerprint is recorded beside it by the caller."""
    import json

    params = json.loads(json.dumps(getattr(space, "params", {}) or {}, sort_keys=True, default=repr))
    return {"space": space.name, "space_params": params}


def space_from_record(record: Dict[str, Any], where: str, hint: str = "pass space=") -> TransformSpace:
    """The space a file records (a predictor checkpoint's or fusion weights' metadata, a label or
    prediction cache's manifest) as ``"space"`` and ``"space_params"`` (:func:`space_record`;
    an absent ``space_params`` is the name alone, as files made before it was recorded), rebuilt
    through the registry: the one way a file names a space. The caller compares fingerprints.
    Anything else is a ``ValueError`` starting with ``where`` and ending with ``hint``."""
    name, params = record.get("space"), record.get("space_params", {})
    if not isinstance(name, str) or not isinstance(params, dict):
        raise ValueError(f"{where}: space must be a registered space name with a parameter object, got "
                         f"{name!r}, {params!r}")
    try:
        return get_space(name, **params)
    except Exception as e:  # noqa: BLE001 - the registry's error, with the file named
        raise ValueError(f"{where}: cannot rebuild its space {name!r} with parameters {params} from the registry "
                         f"({e}); {hint}") from e


#: The built-in space that reads a policy file (``ttach_instance.policy.policy_space``).
POLICY_SPACE = "policy"
_PATH_REF = re.compile(r"^(?P<path>.*\.json)(?::(?P<params>[A-Za-z_]\w*=.*))?$", re.IGNORECASE | re.DOTALL)
_NAME_REF = re.compile(r"^(?P<name>[A-Za-z0-9_][\w.\-]*(?::[A-Za-z0-9_][\w.\-]*)?)(?::(?P<params>[A-Za-z_]\w*=.*))?$",
                       re.DOTALL)
_KEY_RE = re.compile(r"^[A-Za-z_]\w*$")


def parse_space_reference(ref: Any, params: Optional[Dict[str, Any]] = None) -> Tuple[str, Dict[str, Any]]:
    """``(registered name, parameters)`` of a space reference (see the module docstring), with
    ``params`` (keyword arguments) merged in; a parameter given twice is an error. A path ending
    in ``.json`` is the ``policy`` space with ``path`` made absolute (so the recorded parameters
    rebuild it from any working directory); whether the file exists is checked when it is read."""
    params = dict(params or {})
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
        if not isinstance(ref, str):
            raise TypeError(f"space must be a name or a str path, got bytes path {ref!r}")
        return POLICY_SPACE, _merge({"path": os.path.abspath(ref)}, params, ref)
    if not isinstance(ref, str):
        raise TypeError(f"space must be a TransformSpace, a space name, 'name:key=value,...' or a policy file "
                        f"path, got {type(ref).__name__}")
    named = _NAME_REF.match(ref)
    if named and not named.group("name").lower().endswith(".json"):
        if not named.group("params"):
            return ref, params  # a plain or qualified name
        return named.group("name"), _merge(_parse_params(named.group("params"), ref), params, ref)
    path = _PATH_REF.match(ref)
    if path:
        parsed = _parse_params(path.group("params"), ref) if path.group("params") else {}
        return POLICY_SPACE, _merge({"path": os.path.abspath(path.group("path")), **parsed}, params, ref)
    if "/" in ref or os.sep in ref:  # a path, but not to a policy file
        raise ValueError(f"space {ref!r} is neither a registered name nor a policy file: a policy file's path ends "
                         f"in .json (FILE.json, or FILE.json:n=N for its first N candidates)")
    return ref, params  # no reference form: the registry reports the unknown name


def _merge(parsed: Dict[str, Any], params: Dict[str, Any], ref: str) -> Dict[str, Any]:
    twice = sorted(set(parsed) & set(params))
    if twice:
        raise ValueError(f"space {ref!r}: parameter(s) {twice} given both in the reference and as keyword arguments")
    return {**parsed, **params}


def _split_top_level(text: str) -> List[str]:
    """``text`` split at commas outside brackets, braces and double quotes."""
    parts, depth, quoted, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(text):
        if quoted:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _parse_params(text: str, ref: str) -> Dict[str, Any]:
    """``key=value,key=value`` as a dict; values JSON where they parse, else strings."""
    import json

    out: Dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            raise ValueError(f"space {ref!r}: parameters must be key=value pairs separated by commas "
                             f"(e.g. 'five_crops:crop_size=0.8'), got {item!r}")
        if key in out:
            raise ValueError(f"space {ref!r}: parameter {key!r} is given twice")
        raw = raw.strip()
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key] = value
    return out


def list_spaces() -> List[str]:
    """Every name :func:`get_space` accepts (clashed names appear qualified, ``plugin:name``)."""
    return sorted(registry().spaces)


def list_ops() -> List[str]:
    """Every name :func:`make_op` accepts."""
    return sorted(registry().ops)


def make_op(name: str, /, **params: Any):
    """An op by registered family name (``make_op("rotate", angle=15)``)."""
    return registry().make_op(name, **params)


def space_from_specs(specs: Sequence[Any], name: str = "custom") -> TransformSpace:
    """Build a space from JSON-able specs.

    Each candidate is an op spec ``{"op": "rotate", "angle": 20}``, a list of op specs (applied
    in order), or ``{"name": ..., "ops": [...]}``; list values of op parameters become tuples.
    ``space_from_specs(space.spec())`` rebuilds ``space`` (same fingerprint) for spaces made of
    registered ops.
    """
    from .space import Candidate

    if isinstance(specs, (str, bytes, dict)) or not isinstance(specs, Sequence):
        raise TypeError(f"specs must be a list of candidate specs, got {type(specs).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")

    def op_of(spec: Any, where: str):
        if not isinstance(spec, dict) or not isinstance(spec.get("op"), str):
            raise ValueError(f"specs{where}: an op spec is a dict with a string 'op' key, got {spec!r}")
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "op"}
        return make_op(spec["op"], **params)

    def ops_of(items: Any, where: str):
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"specs{where}: 'ops' must be a list of op specs, got {items!r}")
        return [op_of(s, f"{where}[{j}]") for j, s in enumerate(items)]

    cands = []
    for i, item in enumerate(specs):
        if isinstance(item, dict) and "ops" in item:
            cand_name = item.get("name")
            if cand_name is not None and not isinstance(cand_name, str):
                raise ValueError(f"specs[{i}]: 'name' must be a string, got {cand_name!r}")
            cands.append(Candidate(ops_of(item["ops"], f"[{i}].ops"), name=cand_name))
        elif isinstance(item, (list, tuple)):
            cands.append(Candidate(ops_of(item, f"[{i}]")))
        else:
            cands.append(Candidate(op_of(item, f"[{i}]")))
    return TransformSpace(cands, name=name)


def plugin_infos() -> List[PluginInfo]:
    """Every plugin seen: the built-ins, loaded, failed and disabled entry points."""
    return list(registry().plugins.values())
