"""Structure of the repository: the package's import graph has no cycles and no upward arrows
(tools/check_imports.py, which CI also runs), no script or test edits ``sys.path``, and
scripts (benchmarks, research, examples) import only installed packages; the papers the code
follows are cited by their first author."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Offences tolerated for now (keys as the checker prints them, e.g. "cycle: a <-> b"); empty:
#: the package has none.
ALLOWED: set = set()


def _checker():
    """tools/check_imports.py as a module (loaded from its file: tools/ is not a package)."""
    name = "_ti_check_imports"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "check_imports.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _write(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_package_has_no_import_cycles_or_upward_imports():
    offences = _checker().find_offences(ROOT)
    unexpected = [str(o) for o in offences if f"{o.kind}: {o.key}" not in ALLOWED]
    assert not unexpected, "import offences in ttach_instance:\n" + "\n".join(unexpected)


def test_checker_command_line_agrees_and_exits_nonzero_on_offences(tmp_path):
    script = ROOT / "tools" / "check_imports.py"
    here = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    offences = _checker().find_offences(ROOT)
    assert here.returncode == (1 if offences else 0), here.stdout + here.stderr
    _write(tmp_path, {"ttach_instance/__init__.py": "", "ttach_instance/a.py": "from .b import x\n",
                      "ttach_instance/b.py": "from .a import y\n"})
    bad = subprocess.run([sys.executable, str(script), "--root", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "cycle: a <-> b" in bad.stdout and "ttach_instance/b.py:1: b imports a" in bad.stdout


def test_checker_finds_local_cycles_and_upward_imports_and_skips_type_checking(tmp_path):
    _write(tmp_path, {
        "ttach_instance/__init__.py": "from . import space\n",
        # a function-local import still closes a loop
        "ttach_instance/space.py": "def to_ttach():\n    from .interop import f\n    return f\n",
        "ttach_instance/interop.py": "from .space import to_ttach\n",
        # a core module reaching up into training (absolute import, inside a function)
        "ttach_instance/wrappers.py": "def g():\n    import ttach_instance.training.trainer as t\n    return t\n",
        "ttach_instance/training/__init__.py": "",
        "ttach_instance/training/trainer.py": "from ..space import to_ttach\nfrom .. import merge\n",
        # imports that never run are not edges
        "ttach_instance/merge.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .evaluation import x\n",
        "ttach_instance/evaluation.py": "from .merge import y\n",
        # the upper layers may import the core
        "ttach_instance/cli.py": "from .training.trainer import g\nfrom .evaluation import y\n",
    })
    offences = _checker().find_offences(tmp_path)
    assert sorted(f"{o.kind}: {o.key}" for o in offences) == [
        "cycle: interop <-> space",
        "upward: wrappers -> training.trainer",
    ]
    cycle = next(o for o in offences if o.kind == "cycle")
    assert "ttach_instance/space.py:2: space imports interop" in cycle.detail
    assert "ttach_instance/interop.py:1: interop imports space" in cycle.detail


def test_checker_resolves_package_attributes_to_the_package(tmp_path):
    # ``from . import name`` where name is not a module imports the package's __init__.
    _write(tmp_path, {
        "ttach_instance/__init__.py": "from .ops import Op\n",
        "ttach_instance/ops.py": "def f():\n    from . import get_space\n",
    })
    assert [f"{o.kind}: {o.key}" for o in _checker().find_offences(tmp_path)] == ["cycle: ttach_instance <-> ops"]


_SYS_PATH = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\+=|=[^=])")


@pytest.mark.parametrize("folder", ["tests", "benchmarks", "research", "examples"])
def test_no_sys_path_manipulation(folder):
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _SYS_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "sys.path edits (use tests/conftest.py fixtures or the installed package):\n" + "\n".join(found)


_SCRIPT_FOLDERS = ("benchmarks", "research", "examples")
#: Module names a script could only reach through a path edit: the files of tests/ and of the script folders.
_LOCAL_MODULES = {p.stem for d in ("tests",) + _SCRIPT_FOLDERS for p in (ROOT / d).glob("*.py")}


@pytest.mark.parametrize("folder", _SCRIPT_FOLDERS)
def test_scripts_import_only_installed_packages(folder):
    """Benchmarks, research drivers and examples run against the installed package: no imports of
    test helpers or of each other, and no loading of files from tests/ or examples/ by path."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                found.append(f"{rel}:{node.lineno}: relative import")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{rel}:{node.lineno}: imports {n}" for n in names if n.split(".")[0] in _LOCAL_MODULES]
            if isinstance(node, ast.Constant) and node.value in ("tests", "examples"):
                found.append(f"{rel}:{node.lineno}: a path into {node.value}/")
    assert not found, "\n".join(found)


#: Papers cited as "<first author> et al., <venue> <year>" and their first authors.
_FIRST_AUTHORS = {"UAI 2020": "Molchanov"}  # Greedy Policy Search: Molchanov, Lyzhov, Molchanova, Ashukha, Vetrov


def test_papers_are_cited_by_their_first_author():
    found = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if path.suffix not in (".py", ".md", ".json", ".toml") or not path.is_file() \
                or rel.parts[0] in (".git", ".venv", "build") or "egg-info" in str(rel):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for venue, author in _FIRST_AUTHORS.items():
            found += [f"{rel}: {m.group(0)!r}" for m in re.finditer(r"(\w+) et al\.,? " + venue, text)
                      if m.group(1) != author]
    assert not found, "\n".join(found)
