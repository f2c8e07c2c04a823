"""The `pyrebasin` command. Each subcommand lives in pyrebasin/commands/<name>.py and defines
`register(subparsers)`, which adds its parser and sets `func`; they are discovered here.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrebasin",
        description="Align neural networks modulo permutation symmetry and study what lies between them.")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as exc:
        # Caller errors: one line naming what is wrong, no traceback.
        print(f"pyrebasin {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
