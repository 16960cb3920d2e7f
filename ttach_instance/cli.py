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
    from .registry import plugin_infos, registry

    reg = registry()
    infos = plugin_infos()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    for info in infos:
        version = f" {info.version}" if info.version else ""
        package = f"{info.package}{version}" if info.package else "(no distribution)"
        status = "ERROR" if info.errors else "ok"
        print(f"{info.name}  [{package}]  {status}")
        print(f"  module: {info.module}")
        print(f"  spaces: {', '.join(info.spaces) or '-'}")
        print(f"  ops:    {', '.join(info.ops) or '-'}")
        for err in info.errors:
            print(f"  error:  {err}")
    for name, providers in sorted(reg.clashes.items()):
        print(f"clash: space {name!r} is provided by {' and '.join(providers)} (unusable until one is removed)")
    for name, providers in sorted(reg.op_clashes.items()):
        print(f"clash: op {name!r} is provided by {' and '.join(providers)} (unusable until one is removed)")
    return 0


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
