"""Policy files: what ``ttach-instance search {gps,budget}`` writes, read back and made a space.

A policy file is the JSON of :func:`ttach_instance.search.policy_document` (``kind``
``"ttach-instance policy"``, ``format`` :data:`FORMAT`): the chosen candidates in order, each
with its ops and their parameters, the pool they were chosen from, the search's objective and
settings, every step's validation score and temperature, and the model and data searched on.
:func:`load_policy` reads and checks one into a :class:`Policy`; :func:`policy_space` makes the
first ``n`` chosen candidates a :class:`~ttach_instance.TransformSpace`, in order.

Repeats: GPS chooses with replacement, and a candidate chosen twice counts twice in its
ensemble's mean. The space keeps every repeat (a space's candidate names must be unique, so the
``k``-th occurrence of ``name`` is named ``"name#k"``: ``zoom(0.8)``, ``zoom(0.8)#2``), so the
plain mean over the whole space (``FullSpaceWrapper``) is exactly the ensemble GPS scored.

A file's space is also reachable by reference wherever a space name is taken
(``get_space("runs/gps.json:n=4")``, ``--space runs/gps.json``): the built-in space
``policy`` (``get_space("policy", path=..., n=None)``) is this module's :func:`policy_space`.

Every defect is a :class:`PolicyError` (a ``ValueError``) naming the file and the field: not
JSON, another kind of document, an unknown or missing format version, a missing field or one of
the wrong type, steps that contradict the candidates, an op no installed plugin provides, an
``n`` out of range. Why so strict: a policy decides which views a model is averaged over, and a
file that silently means something else would change results without a trace.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .registry import make_op
from .search import POLICY_FORMAT
from .space import Candidate, TransformSpace

__all__ = ["KIND", "FORMAT", "Policy", "PolicyError", "PolicyStep", "PolicyPool", "load_policy", "read_policy",
           "policy_space", "repeat_names"]

#: The ``kind`` every policy file states.
KIND = "ttach-instance policy"
#: The format version this module reads (the one :func:`~ttach_instance.search.policy_document` writes).
FORMAT = POLICY_FORMAT

PolicySource = Union[str, "os.PathLike[str]", Mapping[str, Any], "Policy"]


class PolicyError(ValueError):
    """A policy file (or document) that cannot be used; the message names it and the field."""

    def __init__(self, source: str, field: Optional[str], problem: str):
        self.source, self.field, self.problem = source, field, problem
        super().__init__(f"{source}: field {field!r} {problem}" if field else f"{source}: {problem}")


@dataclass(frozen=True)
class PolicyStep:
    """One search step: the candidate added (its pool ``index`` and name) and the validation
    ``score`` of the first steps up to this one, at ``temperature``."""

    index: int
    candidate: str
    score: float
    temperature: float


@dataclass(frozen=True)
class PolicyPool:
    """The space the candidates were chosen from, as :func:`ttach_instance.get_space` rebuilds it."""

    name: str
    params: Dict[str, Any]
    fingerprint: str
    candidate_names: Tuple[str, ...]


@dataclass(frozen=True)
class Policy:
    """A checked policy file. ``candidates[i]``: the ``i``-th chosen candidate's spec
    (``{"name", "ops": [{"op": ..., **params}]}``, repeats listed again); ``steps[i]``: its step;
    ``document``: the JSON as read (fields this version does not know are kept there)."""

    source: str
    format: int
    search: str
    method: str
    objective: str
    settings: Dict[str, Any]
    candidates: Tuple[Dict[str, Any], ...]
    steps: Tuple[PolicyStep, ...]
    pool: PolicyPool
    model: Dict[str, Any]
    data: Dict[str, Any]
    predictions: Optional[Dict[str, Any]]
    document: Dict[str, Any]

    def __len__(self) -> int:
        return len(self.candidates)

    @property
    def indices(self) -> List[int]:
        """The chosen candidates' indices in the pool, in order (repeats included)."""
        return [s.index for s in self.steps]

    @property
    def names(self) -> List[str]:
        """The space's candidate names: each repeat named ``"name#k"`` (:func:`repeat_names`)."""
        return repeat_names([c["name"] for c in self.candidates])

    @property
    def scores(self) -> List[float]:
        return [s.score for s in self.steps]

    def check_n(self, n: Any) -> int:
        """``n`` (``None``: all) as a count of leading candidates, or a :class:`PolicyError`."""
        if n is None:
            return len(self)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self):
            raise PolicyError(self.source, None, f"n must be an integer in 1..{len(self)} (the policy's candidates), "
                                                 f"got {n!r}")
        return n

    def space(self, n: Optional[int] = None) -> TransformSpace:
        """The first ``n`` candidates (all when ``None``) as a space; see :func:`policy_space`."""
        return policy_space(self, n)


def repeat_names(names: List[str]) -> List[str]:
    """``names`` made unique by occurrence: the first ``x`` stays ``x``, the ``k``-th becomes ``x#k``."""
    seen: Dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


# ----------------------------------------------------------------------------- reading
def load_policy(path: Union[str, "os.PathLike[str]"]) -> Policy:
    """Read and check the policy file at ``path`` (see the module docstring for what is refused)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a policy file path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    source = f"policy file {path!r}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source} does not exist" if not os.path.exists(path) else f"{source} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except UnicodeDecodeError as exc:
        raise PolicyError(source, None, f"is not JSON text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise PolicyError(source, None, f"is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    return read_policy(doc, source)


def read_policy(doc: Any, source: str = "policy document") -> Policy:
    """Check a policy document already parsed from JSON; ``source`` names it in errors."""
    check = _Checker(source)
    if not isinstance(doc, dict):
        raise PolicyError(source, None, f"is not a {KIND} (a JSON object), got a JSON {_json_type(doc)}")
    kind = doc.get("kind")
    if kind != KIND:
        hint = "is missing" if kind is None else f"is {kind!r}"
        if "candidate_names" in doc and "space_fingerprint" in doc:
            hint += " (it looks like a label or prediction cache's manifest)"
        raise PolicyError(source, "kind", f"{hint}, not {KIND!r}: this is not a policy file (they are written by "
                                          f"`ttach-instance search`)")
    fmt = doc.get("format")
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise PolicyError(source, "format", f"must be the integer format version {FORMAT}, got {fmt!r}")
    if fmt != FORMAT:
        era = "a newer" if fmt > FORMAT else "an older"
        raise PolicyError(source, "format", f"is {fmt}, which is not supported: this ttach-instance reads format "
                                            f"{FORMAT} only (the file was written by {era} version; re-run "
                                            f"`ttach-instance search` to write it again)")
    search = check.string(doc, "search")
    method = check.string(doc, "method")
    objective = check.string(doc, "objective")
    settings = check.object(doc, "settings")
    model = check.object(doc, "model")
    data = check.object(doc, "data")
    predictions = doc.get("predictions")
    if predictions is not None and not isinstance(predictions, dict):
        raise PolicyError(source, "predictions", f"must be an object or null, got a JSON {_json_type(predictions)}")

    pool_doc = check.object(doc, "pool")
    pool_names = check.list(pool_doc, "candidate_names", "pool.candidate_names")
    for j, name in enumerate(pool_names):
        if not isinstance(name, str):
            raise PolicyError(source, f"pool.candidate_names[{j}]", f"must be a string, got {name!r}")
    pool = PolicyPool(check.string(pool_doc, "name", "pool.name"), check.object(pool_doc, "params", "pool.params"),
                      check.string(pool_doc, "fingerprint", "pool.fingerprint"), tuple(pool_names))

    candidates = check.list(doc, "candidates")
    if not candidates:
        raise PolicyError(source, "candidates", "is empty: a policy chooses at least one candidate")
    for i, cand in enumerate(candidates):
        where = f"candidates[{i}]"
        if not isinstance(cand, dict):
            raise PolicyError(source, where, f"must be an object {{'name', 'ops'}}, got a JSON {_json_type(cand)}")
        check.string(cand, "name", f"{where}.name")
        ops = check.list(cand, "ops", f"{where}.ops")
        for j, op in enumerate(ops):
            if not isinstance(op, dict) or not isinstance(op.get("op"), str):
                raise PolicyError(source, f"{where}.ops[{j}]", f"must be an op spec {{'op': NAME, ...parameters}}, "
                                                               f"got {op!r}")
    indices = check.list(doc, "indices")
    steps_doc = check.list(doc, "steps")
    for field, items in (("indices", indices), ("steps", steps_doc)):
        if len(items) != len(candidates):
            raise PolicyError(source, field, f"lists {len(items)} entries for {len(candidates)} candidates")
    steps = []
    for i, (index, step, cand) in enumerate(zip(indices, steps_doc, candidates)):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(pool_names):
            raise PolicyError(source, f"indices[{i}]", f"must be an index into the pool's {len(pool_names)} "
                                                       f"candidates, got {index!r}")
        where = f"steps[{i}]"
        if not isinstance(step, dict):
            raise PolicyError(source, where, f"must be an object, got a JSON {_json_type(step)}")
        step_index = check.integer(step, "index", f"{where}.index")
        name = check.string(step, "candidate", f"{where}.candidate")
        score = check.number(step, "score", f"{where}.score")
        temperature = check.number(step, "temperature", f"{where}.temperature")
        if not temperature > 0:
            raise PolicyError(source, f"{where}.temperature", f"must be > 0, got {temperature!r}")
        if step_index != index:
            raise PolicyError(source, f"{where}.index", f"is {step_index} but indices[{i}] is {index}")
        if not name == cand["name"] == pool_names[index]:
            raise PolicyError(source, f"{where}.candidate", f"names {name!r}, candidates[{i}] is {cand['name']!r} "
                                                            f"and the pool's candidate {index} is "
                                                            f"{pool_names[index]!r}: they must agree")
        steps.append(PolicyStep(index, name, float(score), float(temperature)))
    return Policy(source, fmt, search, method, objective, settings, tuple(candidates), tuple(steps), pool, model,
                  data, predictions, doc)


class _Checker:
    """Field checks of one document, each error naming ``source`` and the field's path."""

    def __init__(self, source: str):
        self.source = source

    def _get(self, obj: Dict[str, Any], key: str, field: str) -> Any:
        if key not in obj:
            raise PolicyError(self.source, field, "is missing")
        return obj[key]

    def string(self, obj: Dict[str, Any], key: str, field: Optional[str] = None) -> str:
        value = self._get(obj, key, field or key)
        if not isinstance(value, str) or not value:
            raise PolicyError(self.source, field or key, f"must be a non-empty string, got {value!r}")
        return value

    def object(self, obj: Dict[str, Any], key: str, field: Optional[str] = None) -> Dict[str, Any]:
        value = self._get(obj, key, field or key)
        if not isinstance(value, dict):
            raise PolicyError(self.source, field or key, f"must be an object, got a JSON {_json_type(value)}")
        return value

    def list(self, obj: Dict[str, Any], key: str, field: Optional[str] = None) -> List[Any]:
        value = self._get(obj, key, field or key)
        if not isinstance(value, list):
            raise PolicyError(self.source, field or key, f"must be a list, got a JSON {_json_type(value)}")
        return value

    def integer(self, obj: Dict[str, Any], key: str, field: str) -> int:
        value = self._get(obj, key, field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(self.source, field, f"must be an integer, got {value!r}")
        return value

    def number(self, obj: Dict[str, Any], key: str, field: str) -> float:
        value = self._get(obj, key, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise PolicyError(self.source, field, f"must be a number, got {value!r}")
        return value


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"), ((int, float), "number")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------- spaces
def _as_policy(source: PolicySource) -> Policy:
    if isinstance(source, Policy):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_policy(source)
    if isinstance(source, Mapping):
        return read_policy(dict(source))
    raise TypeError(f"policy must be a policy file path, a policy document (dict) or a Policy, got "
                    f"{type(source).__name__}")


def policy_space(policy: PolicySource, n: Optional[int] = None) -> TransformSpace:
    """The first ``n`` chosen candidates of ``policy`` (a file path, a parsed document or a
    :class:`Policy`; ``n=None``: all of them) as a space, in the order chosen.

    Repeats are kept as ``"name#k"`` (see the module docstring), so the mean over the whole
    space is the policy's ensemble. Each op is rebuilt through the registry, so an op no
    installed plugin provides, or parameters it refuses, is a :class:`PolicyError` naming the
    candidate and op. The space is named ``"policy"``; its ``params`` record the file
    (``path``, absolute) and ``n`` when given, as ``get_space("policy", **params)`` rebuilds it.
    """
    pol = _as_policy(policy)
    count = pol.check_n(n)
    cands = []
    for i, (spec, name) in enumerate(zip(pol.candidates[:count], pol.names)):
        ops = []
        for j, op in enumerate(spec["ops"]):
            params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in op.items() if k != "op"}
            try:
                ops.append(make_op(op["op"], **params))
            except (ValueError, TypeError) as exc:
                raise PolicyError(pol.source, f"candidates[{i}].ops[{j}]",
                                  f"(candidate {spec['name']!r}, op {op['op']!r}) cannot be built: {exc}") from None
        cands.append(Candidate(ops, name=name))
    params: Dict[str, Any] = {}
    if isinstance(policy, (str, os.PathLike)):
        params["path"] = os.path.abspath(os.fspath(policy))
    if n is not None:
        params["n"] = count
    return TransformSpace(cands, name="policy", params=params)
