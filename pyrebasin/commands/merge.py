"""`pyrebasin merge`: MergeMany over N checkpoints of one architecture; writes the merged state and each
model's permutation into the shared space, and with --data a report (accuracies, pairwise barriers)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..io import STATE_SUFFIXES, atomic_write_text, save_state, state_suffix
from . import _common, _many



def run(args: argparse.Namespace) -> int:
    from ..combine import evaluate_combinations
    from ..maps import mean_offdiagonal, pairwise_barriers
    from ..merging import mean_state, merge_many

    state_suffix(Path(args.out))
    if args.report is not None and args.data is None:
        raise ValueError("--report needs --data (the accuracies and barriers are measured on it)")
    report = Path(args.report) / "merge.json" if args.report is not None else None
    _many.check_models(args)
    _common.check_outputs({"--out": args.out, "--perms": args.perms, "--report": report}, _many.model_inputs(args))
    model, states = _many.load_models(args)
    data = None
    if args.data is not None:
        splits = _common.check_data(model, states[0], _common.load_splits(args.data, args.samples),
                                    f"--data {args.data}")
        split = "test" if "test" in splits else "train"
        data = splits[split]
    spec = _common.spec_of(model, data[0] if data is not None else None)
    spec.perm_sizes(states[0])  # names any key the spec and checkpoints disagree on
    t0 = time.perf_counter()
    res = merge_many(spec, states, max_iter=args.max_iter, seed=args.seed, init=args.init,
                     progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    save_state(res.merged, args.out)
    perms = [{p: v.tolist() for p, v in perm.items()} for perm in res.perms]
    if args.perms:
        atomic_write_text(args.perms, json.dumps({"models": [str(m) for m in args.models], "perms": perms}))
    line = (f"MergeMany of {len(states)} models in {seconds:.2f} s ({res.iterations} sweeps, "
            f"{'converged' if res.converged else 'not converged'}); wrote {args.out}")
    if data is None:
        print(line)
        return 0

    def accuracy(state) -> float:
        return float(evaluate_combinations(model, state, state, [1.0], data).accuracy[0])

    kinds = ["endpoint_mean", "any_chord"]
    naive, _ = pairwise_barriers(model, states, data, ts=args.ts, kinds=kinds)
    merged, _ = pairwise_barriers(model, res.aligned, data, ts=args.ts, kinds=kinds)
    out = {"models": [str(m) for m in args.models], "split": split, "seconds": seconds,
           "sweeps": res.iterations, "converged": res.converged, "history": res.history,
           "accuracy": {"models": [accuracy(s) for s in states], "naive_average": accuracy(mean_state(states)),
                        "merged": accuracy(res.merged)},
           "barriers": {"naive": {k: v.tolist() for k, v in naive.items()},
                        "merge_many": {k: v.tolist() for k, v in merged.items()}},
           "mean_barrier": {"naive": mean_offdiagonal(naive["endpoint_mean"]),
                            "merge_many": mean_offdiagonal(merged["endpoint_mean"])}}
    if report is not None:
        atomic_write_text(report, json.dumps(out, indent=1))
    acc, mb = out["accuracy"], out["mean_barrier"]
    print(f"{line}\n{split} accuracy: merged {acc['merged']:.4f}, naive average {acc['naive_average']:.4f}, "
          f"models {min(acc['models']):.4f}-{max(acc['models']):.4f}; mean pairwise loss barrier naive "
          f"{mb['naive']:.4f} -> aligned {mb['merge_many']:.4f}" + (f"; wrote {report}" if report else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge N checkpoints into one basin (MergeMany) and average them")
    _many.add_models_args(p)
    p.add_argument("--out", required=True, help=f"merged checkpoint ({', '.join(STATE_SUFFIXES)})")
    p.add_argument("--perms", default=None, help="also write each model's permutations (JSON) here")
    _common.add_data_args(p, default=None)
    p.add_argument("--report", default=None, help="folder for merge.json (accuracies, barriers; needs --data)")
    p.add_argument("--ts", type=_common.int_at_least(2), default=11, help="points per pairwise curve")
    p.add_argument("--init", choices=("reference", "identity"), default="reference",
                   help="start from every model matched to the first one, or from the raw models")
    p.add_argument("--seed", type=_common.SEED, default=0, help="MergeMany's sweep order")
    p.add_argument("--max-iter", type=_common.int_at_least(1), default=100, help="sweeps at most")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
