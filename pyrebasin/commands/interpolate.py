"""`pyrebasin interpolate`: loss/accuracy along θ(t) = (1−t)·θ_A + t·θ_B for two checkpoints
(optionally aligned first, with RESET or REPAIR); writes curve.json (curve + barriers) and curve.png.
A causal LM on token data is scored by next-token loss, accuracy and perplexity."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import _common


def run(args: argparse.Namespace) -> int:
    import pyrebasin as prb

    from ..experiments.plots import plot_curves
    from ..io import atomic_write_text
    from ..lmc import BARRIER_KINDS, barrier, interpolate

    out = Path(args.out)
    _common.check_outputs({"--out": out / "curve.json", "--out (png)": out / "curve.png"},
                          {"--a": args.a, "--b": args.b, "--data": _common.data_file(args.data)})
    model, state_a, state_b = _common.load_pair(args)
    splits = _common.check_data(model, state_a, _common.load_splits(args.data, args.samples, seq_len=args.seq_len,
                                                                    tokenizer=args.tokenizer), f"--data {args.data}")
    lm = _common.is_token_split(splits["train"])
    x = _common.inputs_of(splits["train"])
    info = {"align": args.align, "objective": "next-token" if lm else "classification"}
    if args.align != "none":
        spec = _common.spec_of(model, x)
        t0 = time.perf_counter()
        result = _common.align(model, spec, state_a, state_b, args.align, x, progress=not args.no_progress)
        state_b = prb.apply_permutation(spec, result.perms, state_b)
        info["align_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = interpolate(model, state_a, state_b, splits, args.ts, buffers=args.buffers, repair=args.repair,
                    stat_data=x, progress=not args.no_progress)
    info["seconds"] = time.perf_counter() - t0
    arch = args.arch or args.hf_config or getattr(model.config, "model_type", type(model).__name__)
    c.meta.update(info, a=str(args.a), b=str(args.b), arch=arch)
    metrics = ("loss", "accuracy", "perplexity") if lm else ("loss", "accuracy")
    barriers = {f"{m}/{k}/{s}": barrier(c, m, k, split=s) for m in metrics for k in BARRIER_KINDS for s in c.splits}
    report = {"curve": c.to_dict(), "barriers": barriers}
    if lm:
        report["perplexity"] = {s: c.perplexity(s) for s in c.splits}
    atomic_write_text(out / "curve.json", json.dumps(report, indent=1))
    label = "aligned" if args.align != "none" else "naive"
    if args.repair:
        label += " + REPAIR"
    elif args.buffers == "reset":
        label += " + RESET"
    name = args.arch or (Path(args.hf_config).name if args.hf_config else arch)
    plot_curves({label: c}, out / "curve.png", title=f"{name}: {Path(args.a).name} → {Path(args.b).name}")
    split = "test" if "test" in c.splits else "train"
    ppl = ""
    if lm:
        p = c.perplexity(split)
        ppl = (f", perplexity A {p[0]:.3f} → B {p[-1]:.3f} (max {max(p):.3f}, barrier "
               f"{barriers[f'perplexity/endpoint_mean/{split}']:.3f})")
    print(f"loss barrier ({split}) {barriers[f'loss/endpoint_mean/{split}']:.4f}, accuracy barrier "
          f"{barriers[f'accuracy/endpoint_mean/{split}']:.4f}{ppl}; wrote {out / 'curve.json'} and {out / 'curve.png'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("interpolate",
                       help="loss/accuracy (and LM perplexity) curve between two checkpoints (JSON + PNG)")
    _common.add_pair_args(p, directories=True)
    p.add_argument("--out", required=True, help="output folder (curve.json, curve.png)")
    _common.add_data_args(p)
    p.add_argument("--ts", type=_common.int_at_least(2), default=25, help="number of evenly spaced t in [0, 1]")
    p.add_argument("--align", choices=("none", "weight", "activation"), default="none",
                   help="permute B onto A first")
    p.add_argument("--buffers", choices=("interpolate", "reset"), default="interpolate",
                   help="BatchNorm statistics: interpolated, or recomputed (RESET)")
    p.add_argument("--repair", action="store_true", help="apply REPAIR at every t")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
