"""ttach-instance-gps: Greedy Policy Search policies as a ttach-instance space.

``ttach_instance.get_space("gps", path="policy.json", n=None)`` reads a policy file written by
``ttach-instance search gps``; ``get_space("gps", policy="demo-photos", n=None)`` one bundled
with this package (:func:`list_policies`). The space is the policy's first ``n`` candidates in
the order GPS chose them, a candidate chosen again kept as ``"name#k"``, so the plain mean over
the space (``FullSpaceWrapper``) is the ensemble GPS scored (:mod:`ttach_instance.policy`).

A bundled policy is a file ``policies/<name>.json`` in this package: adding one is dropping a
file written by ``ttach-instance search gps`` there (the tests check every bundled file).
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from typing import List, Optional

from ttach_instance.policy import load_policy, policy_space
from ttach_instance.space import TransformSpace

__all__ = ["gps_space", "list_policies", "policy_file"]
__version__ = "0.1.0"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _folder():
    return resources.files(__name__) / "policies"


def list_policies() -> List[str]:
    """The bundled policies' names (``policies/<name>.json``), sorted."""
    folder = _folder()
    if not folder.is_dir():
        return []
    return sorted(f.name[: -len(".json")] for f in folder.iterdir()
                  if f.is_file() and f.name.endswith(".json") and _NAME_RE.match(f.name[: -len(".json")]))


def policy_file(name: str) -> str:
    """The path of the bundled policy ``name`` (an unknown name is a ``ValueError`` listing the known)."""
    if not isinstance(name, str):
        raise TypeError(f"gps: policy must be a bundled policy's name (str), got {type(name).__name__}")
    known = list_policies()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=2)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"gps: no bundled policy {name!r}{hint}; bundled: {known}; or pass path=FILE.json")
    return str(_folder() / f"{name}.json")


def gps_space(path: Optional[str] = None, policy: Optional[str] = None, n: Optional[int] = None) -> TransformSpace:
    """The first ``n`` (``None``: all) candidates of a GPS policy: the file at ``path`` or the
    bundled ``policy`` (exactly one of the two). A policy file written by another search
    (``search budget``) is refused: use the core's ``policy`` space (``--space FILE.json``) for it.
    Every defect of the file is a ``ttach_instance.policy.PolicyError`` naming it and the field."""
    if (path is None) == (policy is None):
        raise ValueError(f"gps: give exactly one of path=FILE.json (a `ttach-instance search gps` output) or "
                         f"policy=NAME (bundled: {list_policies()}), got path={path!r}, policy={policy!r}")
    loaded = load_policy(path if path is not None else policy_file(policy))
    if loaded.search != "gps":
        raise ValueError(f"gps: {loaded.source} was written by `ttach-instance search {loaded.search}`, not GPS; the "
                         f"core's policy space takes any policy file (get_space('policy', path=...) or "
                         f"--space FILE.json)")
    return policy_space(loaded, n)
