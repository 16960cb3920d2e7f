"""The ``ttach-instance`` command line.

Each subcommand lives in its own ``_cmd_*`` function registered in :func:`build_parser`;
heavy imports happen inside the command so ``ttach-instance plugins`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_plugins(args: argparse.Namespace) -> int:
    """List every plugin seen (built-ins, loaded, failed, disabled) with its package, version,
    spaces and ops, then name clashes. ``--strict`` exits 1 when a plugin failed or names clash."""
    import warnings

    from .registry import PluginWarning, registry

    with warnings.catch_warnings():  # the listing below reports every problem itself
        warnings.simplefilter("ignore", PluginWarning)
        reg = registry()
    infos = list(reg.plugins.values())
    clashes = [("space", n, p) for n, p in sorted(reg.clashes.items())]
    clashes += [("op", n, p) for n, p in sorted(reg.op_clashes.items())]
    if args.json:
        payload = {
            "plugins": [info.to_dict() for info in infos],
            "clashes": [{"kind": k, "name": n, "providers": p} for k, n, p in clashes],
            "problems": list(reg.problems),
        }
        print(json.dumps(payload, indent=2))
    else:
        for info in infos:
            package = f"{info.package} {info.version or '(unknown version)'}" if info.package else "(no distribution)"
            print(f"{info.name}  [{package}]  {info.status.upper() if info.status == 'error' else info.status}")
            print(f"  module: {info.module}")
            if info.status != "disabled":
                print(f"  spaces: {', '.join(info.spaces) or '-'}")
                print(f"  ops:    {', '.join(info.ops) or '-'}")
            for err in info.errors:
                print(f"  {'note' if info.status == 'disabled' else 'error'}:  {err}")
        for kind, name, providers in clashes:
            labels = " and ".join(reg.plugins[p].label for p in providers)
            qualified = ", ".join(f"{p}:{name}" for p in providers)
            print(f"clash: {kind} {name!r} is provided by {labels}; unusable bare, use {qualified}")
        for problem in reg.problems:
            print(f"problem: {problem}")
    failed = any(info.status == "error" for info in infos) or reg.problems
    return 1 if args.strict and (failed or clashes) else 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from .registry import get_space, list_spaces, registry

    reg = registry()
    for name in list_spaces():
        entry = reg.spaces[name]
        try:
            space = get_space(name)
            detail = f"{len(space)} candidates, fingerprint {space.fingerprint}"
            names = ", ".join(space.names)
        except Exception as exc:  # a plugin's factory may need parameters or be broken
            detail, names = f"not buildable without parameters ({exc})", ""
        print(f"{name}  [{entry.provider}]  {detail}")
        if entry.description:
            print(f"  {entry.description}")
        if names and args.verbose:
            print(f"  {names}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from .demo import render_space

    path = render_space(args.space, args.output, size=args.size)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttach-instance", description="Instance-aware test-time augmentation (Learning Loss for TTA) on ttach."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins, their package, version, spaces and ops")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit 1 if a plugin failed to load or names clash")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("spaces", help="list registered transform spaces")
    p.add_argument("-v", "--verbose", action="store_true", help="also list candidate names")
    p.set_defaults(func=_cmd_spaces)

    p = sub.add_parser("render", help="render every candidate of a space on a bundled photo to a PNG grid")
    p.add_argument("--space", default="paper12")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--output", default="outputs/space_grid.png")
    p.set_defaults(func=_cmd_render)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
