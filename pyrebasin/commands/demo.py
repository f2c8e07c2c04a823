"""`pyrebasin demo`: the main job — train (or load cached) mnist1d model pairs, align them, and write
report.json, report.md and PNG plots of interpolation curves and barriers (see experiments/demo.py)."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..experiments.demo import run_demo
    from . import _common

    _common.check_outputs({"--out": Path(args.out) / "report.json", "--out (md)": Path(args.out) / "report.md"}, {})
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    report = run_demo(args.out, quick=args.quick, progress=not args.no_progress, only=only)
    print(f"wrote {args.out}/report.md, report.json and {sum(len(s['figures']) for s in report['sections'])} "
          f"plots in {report['seconds']['total']:.0f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="train, align and compare models on mnist1d; write a report")
    p.add_argument("--out", default="out/demo", help="output folder (report.json, report.md, PNGs)")
    p.add_argument("--quick", action="store_true", help="small models and few points (about a minute)")
    p.add_argument("--only", default=None, help="comma-separated section keys (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
