"""The `nhigate` command: one entry point, one sub-command module each."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module exposes `add_parser(subparsers)`, which registers its sub-command(s) and sets
# `func(args) -> int` as the parser default. Imported lazily so `nhigate explain` does not
# pay for aiohttp or kopf.
COMMAND_MODULES: dict[str, str] = {
    "explain": "nhigate.cli.explain",
    "who-can": "nhigate.cli.explain",
    "proxy": "nhigate.cli.proxy",
    "controller": "nhigate.cli.controller",
    "access-review": "nhigate.cli.review",
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The argument parser; only the named sub-command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="nhigate",
        description="Identity-aware proxy and operator for non-human identities.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = (
        {COMMAND_MODULES[command]} if command in COMMAND_MODULES else set(COMMAND_MODULES.values())
    )
    for module_name in sorted(modules):
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `nhigate` command line; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    args = build_parser(command).parse_args(args_list)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
