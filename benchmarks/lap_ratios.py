"""LAP time inside weight matching (warm-started `jv`) against cold solves of the same cost matrices
by scipy, lapx's lapjv and cold `jv`, measured in one run (MLP 784-n-n-10, n=4096 by default).

    PYTHONPATH=$PWD python benchmarks/lap_ratios.py [--width 4096] [--keep 6]
"""
from __future__ import annotations

import argparse
import time
from collections import deque

import torch

import pyrebasin as prb
from pyrebasin.matching import lap as lap_mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--keep", type=int, default=6, help="LAPs re-solved cold (first 2 and the last ones)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-iter", type=int, default=4, help="sweeps (each is minutes at n=4096 on 1 core)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    st = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = prb.zoo.MLP(in_features=784, width=args.width, depth=2, classes=10)
        st.append(model.state_dict())
    spec = model.permutation_spec()

    first, last, inside = [], deque(maxlen=max(1, args.keep - 2)), []
    real = lap_mod.solve_lap

    def recording(cost, **kw):
        t = time.perf_counter()
        out = real(cost, **kw)
        inside.append(time.perf_counter() - t)
        (first if len(first) < 2 else last).append(cost.clone())
        return out

    lap_mod.solve_lap = recording  # LapPolicy, the solver policy of weight matching, calls it
    try:
        t = time.perf_counter()
        result = prb.weight_matching(spec, st[0], st[1], max_iter=args.max_iter, method="textbook")
        total = time.perf_counter() - t
    finally:
        lap_mod.solve_lap = real
    print(f"MLP 784-{args.width}-{args.width}-10: {result.iterations} sweeps, {len(inside)} LAPs of n={args.width}, "
          f"matching {total:.2f} s, of which LAP (warm jv) {sum(inside):.2f} s")
    sample = first + list(last)
    idx = list(range(2)) + list(range(len(inside) - len(last), len(inside)))
    warm = sum(inside[i] for i in idx)
    print(f"re-solving {len(sample)} of them cold (LAPs {idx}); warm jv inside matching took {warm:.2f} s")
    print(f"  warm jv (inside)  per LAP {[round(inside[i], 2) for i in idx]}")
    for solver in lap_mod.available_solvers():
        per = []
        for c in sample:
            t = time.perf_counter()
            real(c, solver=solver)
            per.append(time.perf_counter() - t)
        dt = sum(per)
        print(f"  cold {solver:6s} {dt:7.2f} s   ratio to warm jv {dt / warm:5.2f}x  per LAP {[round(x, 2) for x in per]}")


if __name__ == "__main__":
    main()
