"""`pyrebasin connectivity`: the N×N barrier map of N checkpoints (naive or aligned), its spectral clusters
as connectivity.json and a heatmap connectivity.png; with --plane the loss plane through the first three."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import _common, _many


def run(args: argparse.Namespace) -> int:
    import torch

    from ..experiments.connectivity import connectivity_map, plot_loss_plane
    from ..maps import loss_plane

    _many.check_models(args)
    n = len(args.models)
    if args.clusters is not None and args.clusters > n:
        raise ValueError(f"--clusters {args.clusters} exceeds the number of models ({n})")
    if args.plane and n < 3:
        raise ValueError(f"--plane needs at least 3 models (the plane through the first three), got {n}")
    out = Path(args.out)
    outputs = {"--out (json)": out / "connectivity.json", "--out (png)": out / "connectivity.png"}
    if args.plane:
        outputs["--out (plane)"] = out / "loss_plane.png"
    _common.check_outputs(outputs, _many.model_inputs(args))
    model, states = _many.load_models(args)
    splits = _common.check_data(model, states[0], _common.load_splits(args.data, args.samples), f"--data {args.data}")
    split = args.split or ("test" if "test" in splits else "train")
    if split not in splits:
        raise ValueError(f"--split {split}: --data {args.data} has no {split} split (has {sorted(splits)})")
    data = splits[split]
    spec = _common.spec_of(model, data[0]) if args.align != "none" else None
    names = [Path(p).stem for p in args.models]
    if len(set(names)) < n:
        names = [f"{i}:{name}" for i, name in enumerate(names)]
    t0 = time.perf_counter()
    cmap = connectivity_map(model, states, data, ts=args.ts, align=None if args.align == "none" else args.align,
                            n_clusters=args.clusters, spec=spec, names=names, seed=args.seed,
                            progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    cmap.to_json(out / "connectivity.json")
    cmap.plot(out / "connectivity.png", title=f"{args.arch}: {cmap.cluster_kind} loss barriers on {split} "
              f"({args.align}), {cmap.n_clusters} clusters")
    wrote = [out / "connectivity.json", out / "connectivity.png"]
    if args.plane:
        plane = loss_plane(model, states[0], states[1], states[2], data, grid=args.grid,
                           progress=not args.no_progress)
        plot_loss_plane(plane, out / "loss_plane.png", labels=names[:3])
        wrote.append(out / "loss_plane.png")
    b = cmap.barriers[cmap.cluster_kind]
    off = b[~torch.eye(n, dtype=torch.bool)]
    print(f"{n} models, {n * (n - 1) // 2} pairs in {seconds:.1f} s ({args.align}): {cmap.cluster_kind} barrier "
          f"{float(off.min()):.4f}-{float(off.max()):.4f}; clusters {cmap.clusters}; wrote "
          + ", ".join(str(p) for p in wrote))
    return 0


def register(sub) -> None:
    p = sub.add_parser("connectivity", help="N×N barrier map of N checkpoints with spectral clusters (JSON + PNG)")
    _many.add_models_args(p)
    p.add_argument("--out", required=True, help="output folder (connectivity.json, connectivity.png[, loss_plane.png])")
    _common.add_data_args(p)
    p.add_argument("--split", choices=("train", "test"), default=None,
                   help="the split the curves are evaluated on (default: test when the data has one)")
    p.add_argument("--align", choices=("none", "weight", "activation", "merge"), default="none",
                   help="per pair (weight, activation: j matched to i) or one MergeMany space (merge)")
    p.add_argument("--ts", type=_common.int_at_least(2), default=11, help="points per pairwise curve")
    p.add_argument("--clusters", type=_common.int_at_least(1), default=None,
                   help="number of clusters (default: chosen by the largest eigengap)")
    p.add_argument("--plane", action="store_true", help="also the loss plane through the first three models")
    p.add_argument("--grid", type=_common.int_at_least(2), default=13, help="loss plane points per axis")
    p.add_argument("--seed", type=_common.SEED, default=0, help="spectral clustering's seed")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
