"""`pyrebasin stitch`: stitch two seeds of a zoo model at every layer; writes JSON, Markdown and PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import _common


def _config(text: str) -> tuple[str, str]:
    kind, sep, init = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND:INIT, e.g. affine:least_squares")
    return kind, init


def run(args: argparse.Namespace) -> int:
    import importlib

    import pyrebasin as prb

    from ..fileio import atomic_write_text
    from ..io import parse_kwargs

    out = Path(args.out)
    _common.check_outputs({"--out": out / "stitching.json", "--out (md)": out / "stitching.md",
                           "--out (png)": out / "stitching.png"}, {})
    study_mod = importlib.import_module("pyrebasin.experiments.stitching")
    arch_kwargs = parse_kwargs(args.arch_kwargs)
    if args.arch == "mlp":
        arch_kwargs = {"width": args.width, "depth": args.depth, **arch_kwargs}
    study = study_mod.stitching(
        args.arch, seeds=tuple(args.seeds), configs=tuple(args.configs or study_mod.DEFAULT_CONFIGS),
        layers=args.layers, dataset=args.dataset, train_config=prb.train.TrainConfig(epochs=args.epochs),
        stitch_epochs=args.stitch_epochs, lr=args.lr, targets=args.targets, rank_fraction=args.rank_fraction,
        seed=args.seed, progress=not args.no_progress, **arch_kwargs)
    study.save_json(out / "stitching.json")
    png = study.plot(out / "stitching.png")
    atomic_write_text(out / "stitching.md", study.table() + "\n")
    print(study.table())
    print(f"wrote {out / 'stitching.json'}, {out / 'stitching.md'}, {png}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("stitch", help="stitch two seeds of a zoo model at every layer (Dr. Frankenstein)",
                       description="Train two seeds of a zoo model (cached), stitch seed A into seed B at every "
                                   "candidate layer with each KIND:INIT, train the stitching layers, and report "
                                   "relative accuracy next to CKA/CCA/R² per layer.")
    p.add_argument("--arch", default="mlp", choices=["mlp", "vgg", "resnet20", "transformer"])
    p.add_argument("--width", type=_common.int_at_least(1), default=128, help="MLP hidden width")
    p.add_argument("--depth", type=_common.int_at_least(1), default=3, help="MLP hidden layers")
    p.add_argument("--arch-kwargs", default="", help='extra zoo kwargs as JSON, e.g. \'{"width_multiplier": 2}\'')
    p.add_argument("--seeds", type=_common.SEED, nargs=2, default=[0, 1], metavar=("FRONT", "END"))
    p.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"])
    p.add_argument("--epochs", type=_common.int_at_least(1), default=10, help="training epochs of the two models (cached)")
    p.add_argument("--configs", type=_config, nargs="+", metavar="KIND:INIT",
                   help="stitching configurations (default: affine:least_squares affine:identity ...)")
    p.add_argument("--layers", nargs="+", help="module paths to stitch at (default: every candidate layer)")
    p.add_argument("--stitch-epochs", type=_common.int_at_least(0), default=3)
    p.add_argument("--lr", type=_common.finite_float(0, open_low=True), default=1e-3)
    p.add_argument("--targets", default="hard", choices=["hard", "soft"])
    p.add_argument("--rank-fraction", type=_common.finite_float(0, 1, open_low=True), default=0.25, help="low_rank: rank = fraction x channels")
    p.add_argument("--seed", type=_common.SEED, default=0)
    p.add_argument("--out", default="out/stitch", help="output folder (stitching.json/.md/.png)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
