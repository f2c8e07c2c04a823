"""The `pyrebasin` command: demo, align, interpolate, combine, stitch (subcommands grow per module)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import pyrebasin as prb

    model = prb.zoo.MLP(40, 64, 2)
    spec = model.permutation_spec()
    state = model.state_dict()
    perms = prb.random_permutation(spec, state, 0)
    permuted = prb.apply_permutation(spec, perms, state)
    back = prb.apply_permutation(spec, prb.invert_permutation(perms), permuted)
    ok = all(torch.equal(back[k], state[k]) for k in state)
    print(f"backend={prb.backend()} spec={spec} round-trip identical={ok}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrebasin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, align and compare models on mnist1d; write a report")
    demo.add_argument("--out", default="out/demo", help="output folder (report.json, report.md, PNGs)")
    demo.add_argument("--quick", action="store_true", help="small models and few points (about a minute)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
