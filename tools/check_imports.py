#!/usr/bin/env python
"""Check the import graph of ``ttach_instance``: no cycles, no upward imports.

Every ``import`` / ``from ... import`` in the package counts, at module level or inside a
function (a function-local import hides a loop from Python, not from the design); imports under
``if TYPE_CHECKING:`` are skipped (they never run). Two kinds of offence:

* **cycle**: modules that import each other, directly or through others (one strongly connected
  component of the graph each, with the import lines that close it);
* **upward**: a core module (kernels, ops, spaces, selection, merge, wrappers, predictors, I/O,
  plugins) importing from the layers built on it (training, evaluation, the CLI, the demo).

Edges go to the module named: ``from .a import b`` is an edge to ``a`` (and to ``a.b`` when that is
a module); ``from . import x`` to the module ``x`` when it exists, else to the package itself.
The implicit import of parent packages is not an edge (every module would import the root).

Usage: ``python tools/check_imports.py [--root DIR]``; prints each offence and exits 1 if any.
Why: the layering is what lets the core be used, tested and reasoned about without the rest.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

PACKAGE = "ttach_instance"
#: Core modules (a name, or a prefix ending in ``*``), relative to the package.
CORE = (
    "functional",
    "ops",
    "space",
    "interop",
    "builtin_spaces",
    "hookspecs",
    "registry",
    "selection",
    "merge",
    "normalization",
    "io",
    "wrappers",
    "predictor*",
)
#: The layers above the core (same notation).
UPPER = ("training*", "evaluation*", "cli*", "demo*")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Offence:
    kind: str  # "cycle" or "upward"
    key: str  # stable across line moves: used by allow-lists
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.key}\n{self.detail}"


def _matches(module: str, patterns: Tuple[str, ...]) -> bool:
    rel = module[len(PACKAGE) + 1 :] if module.startswith(PACKAGE + ".") else ""
    for p in patterns:
        if p.endswith("*") and rel.startswith(p[:-1]):
            return True
        if rel == p or rel.startswith(p + "."):
            return True
    return False


def discover(root: Path) -> Dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``root/ttach_instance``."""
    base = root / PACKAGE
    if not (base / "__init__.py").is_file():
        raise SystemExit(f"--root must contain {PACKAGE}/__init__.py, got {root}")
    modules = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.stmt]:
    """Every import statement, nested ones included, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> Optional[str]:
    """Absolute name of ``from <...> import`` in ``module`` (None if it leaves the package)."""
    if node.level == 0:
        return node.module
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    if not parts:
        return None
    return ".".join(parts + ([node.module] if node.module else []))


def edges_of(module: str, path: Path, modules: Dict[str, Path], root: Path) -> List[Edge]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    rel = str(path.relative_to(root))
    out: List[Edge] = []

    def add(target: str, line: int) -> None:
        # the nearest module at or above ``target`` (``pkg.mod.attr`` -> ``pkg.mod``)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            out.append(Edge(module, target, rel, line))

    for node in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name, node.lineno)
            continue
        base = _resolve(module, is_package, node)
        if base is None or not (base == PACKAGE or base.startswith(PACKAGE + ".")):
            continue
        named_modules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        if named_modules and len(named_modules) == len(node.names):
            for m in named_modules:
                add(m, node.lineno)
        else:
            add(base, node.lineno)
            for m in named_modules:
                add(m, node.lineno)
    return out


def build_graph(root: Path) -> Tuple[Dict[str, Path], List[Edge]]:
    modules = discover(root)
    edges: List[Edge] = []
    for name, path in modules.items():
        edges.extend(edges_of(name, path, modules, root))
    return modules, edges


def _sccs(nodes: List[str], succ: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(succ.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def _short(module: str) -> str:
    return module[len(PACKAGE) + 1 :] if module.startswith(PACKAGE + ".") else module


def find_offences(root: Path) -> List[Offence]:
    modules, edges = build_graph(root)
    succ: Dict[str, Set[str]] = {}
    for e in edges:
        succ.setdefault(e.source, set()).add(e.target)
    offences: List[Offence] = []
    for comp in _sccs(sorted(modules), succ):
        members = set(comp)
        if len(comp) == 1 and comp[0] not in succ.get(comp[0], ()):
            continue
        inner = sorted(
            (e for e in edges if e.source in members and e.target in members),
            key=lambda e: (e.source, e.line, e.target),
        )
        detail = "\n".join(f"  {e.where()}: {_short(e.source)} imports {_short(e.target)}" for e in inner)
        offences.append(Offence("cycle", " <-> ".join(_short(m) for m in comp), detail))
    seen = set()
    for e in sorted(edges, key=lambda e: (e.source, e.line, e.target)):
        if _matches(e.source, CORE) and _matches(e.target, UPPER):
            key = f"{_short(e.source)} -> {_short(e.target)}"
            if key in seen:
                continue
            seen.add(key)
            same = sorted((x for x in edges if (x.source, x.target) == (e.source, e.target)), key=lambda x: x.line)
            lines = ", ".join(x.where() for x in same)
            offences.append(Offence("upward", key, f"  {lines}: a core module imports from a layer above it"))
    return offences


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="repository root")
    args = parser.parse_args(argv)
    offences = find_offences(args.root)
    for o in offences:
        print(o)
    if offences:
        print(f"{len(offences)} import offence(s) in {PACKAGE}")
        return 1
    print(f"{PACKAGE}: no import cycles, no upward imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
