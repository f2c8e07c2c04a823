"""`pyrebasin demo`: the main job (grows into train -> align -> interpolate -> report)."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
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


def register(sub) -> None:
    p = sub.add_parser("demo", help="train, align and compare models on mnist1d; write a report")
    p.add_argument("--out", default="out/demo", help="output folder (report.json, report.md, PNGs)")
    p.add_argument("--quick", action="store_true", help="small models and few points (about a minute)")
    p.set_defaults(func=run)
