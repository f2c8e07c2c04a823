"""The `pyrebasin` command. Each subcommand lives in pyrebasin/commands/<name>.py and defines
`register(subparsers)`, which adds its parser and sets `func`; they are discovered here.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import pkgutil
import sys

from . import commands, distributed, fileio

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """Usage errors in the one-line form of every other caller error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyrebasin",
        description="Align neural networks modulo permutation symmetry and study what lies between them.")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Under a launcher such as torchrun every rank joins the process group, the
    library splits the work, and only rank 0 writes files, prints and shows progress."""
    args = build_parser().parse_args(argv)
    try:
        with distributed.from_environment(), contextlib.ExitStack() as quiet:
            if not distributed.is_writer():
                quiet.enter_context(fileio.discard_writes())
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                args.no_progress = True
            return int(args.func(args) or 0)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        # Caller errors (and files that cannot be read or written: a full disk, a directory in the
        # way): one line naming what is wrong, no traceback.
        text = str(exc).strip().splitlines()
        print(f"pyrebasin {args.command}: error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
