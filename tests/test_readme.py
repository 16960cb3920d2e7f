"""The README's command examples against the CLI and the registry: every `search` method is shown,
every subcommand and space reference in its examples exists (the commands themselves run on real
data: they were run on tiny data by hand, and the CLI tests cover each one)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ttach_instance.cli import build_parser
from ttach_instance.registry import get_space, list_spaces

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
BASH = [re.sub(r"\\\n\s*", "", block) for block in re.findall(r"```bash\n(.*?)```", README, re.S)]
COMMANDS = [shlex.split(line.split("#")[0]) for block in BASH for line in block.splitlines()
            if line.startswith("ttach-instance ")]


def _subcommands(parser) -> dict:
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_search_method_has_an_example():
    search = _subcommands(build_parser())["search"]
    methods = next(a for a in search._actions if a.dest == "method").choices
    shown = {c[2] for c in COMMANDS if c[1] == "search"}
    assert shown == set(methods), f"README shows `search` {sorted(shown)}, the CLI has {sorted(methods)}"


def test_example_commands_parse():
    """Each example's arguments as the CLI parses them (placeholders like DATA are strings)."""
    parser = build_parser()
    assert COMMANDS
    for command in COMMANDS:
        if "..." in command:  # an abbreviated line ("eval ... --fusion FILE")
            continue
        parser.parse_args(command[1:])


def _references():
    refs = {c[i + 1] for c in COMMANDS for i, a in enumerate(c[:-1]) if a == "--space"}
    inline = re.findall(r"`([a-z][a-z0-9_]*:[a-z_]+=[^`\s]+)`", README)  # `name:key=value,...`
    return sorted(refs | set(inline))


@pytest.mark.parametrize("ref", _references())
def test_space_references_in_the_readme_build(ref):
    name = ref.split(":")[0]
    if name.endswith(".json") or "runs/" in ref:
        pytest.skip("a policy file the examples write")
    if name not in list_spaces() and name in ("gps",):
        pytest.skip(f"plugin space {name!r} not installed")
    assert len(get_space(ref)) >= 1
