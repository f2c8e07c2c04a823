"""lap_solve, as ratios measured in one run, on weight-matching costs C = W_A W_Bᵀ of width n:
cold native against scipy's linear_sum_assignment and lapx's lapjv (when installed) on the same
matrices, warm-started native (the previous solve's duals, as weight matching reuses them) against
cold native, and native against its reference twin (the same algorithm ported to torch; small n).

Two cost families: "unrelated" (W_B independent of W_A, like two random inits) and "related" (W_B =
0.5 W_A[π] + noise: a planted permutation, like two models that learnt the same features).

    PYTHONPATH=$PWD python benchmarks/lap_solve.py [--n 2048] [--solves 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import pyrebasin as prb
from pyrebasin import ops, reference


def costs(n: int, solves: int, signal: float, seed: int = 0) -> list[torch.Tensor]:
    """Successive costs of one group as coordinate descent sees them: C_t = W_A (W_B + drift_t)ᵀ."""
    g = torch.Generator().manual_seed(seed)
    wa = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    wb = signal * wa[torch.randperm(n, generator=g)] + torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    out = []
    for _ in range(solves):
        out.append(wa @ wb.T)
        wb = wb + 0.02 * torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peers():
    found = {}
    try:
        from scipy.optimize import linear_sum_assignment

        found["scipy"] = lambda c: linear_sum_assignment(c)
    except ImportError:
        pass
    try:
        import lap as lapx

        found["lapx lapjv"] = lambda c: lapx.lapjv(c)
    except ImportError:
        pass
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--solves", type=int, default=4)
    ap.add_argument("--reference-n", type=int, default=128, help="size of the native vs reference case")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not prb.native_available():
        raise SystemExit("native extension not built: nothing to compare")
    torch.set_num_threads(args.threads)
    print(f"n = {args.n}, {args.solves} successive costs per family, {args.threads} thread(s)")
    for family, signal in (("unrelated", 0.0), ("related", 0.5)):
        seq = [-c for c in costs(args.n, args.solves, signal)]  # minimisation form of the maximising problem
        cold = sum(timed(lambda c=c: ops.lap_solve(c)) for c in seq)
        warm, state = 0.0, None
        for c in seq:
            t = time.perf_counter()
            col, v, _ = ops.lap_solve(c, *(state or (None, None)))
            warm += time.perf_counter() - t
            state = (v, col)
        print(f"{family}: native cold {cold:6.2f} s   native warm {warm:6.2f} s   cold / warm {cold / warm:5.2f}x")
        for name, solve in peers().items():
            dt = sum(timed(lambda c=c: solve(np.ascontiguousarray(c.numpy()))) for c in seq)
            print(f"  {name:11s} {dt:6.2f} s   / native cold {dt / cold:5.2f}x   / native warm {dt / warm:5.2f}x")
    small = -costs(args.reference_n, 1, 0.0, seed=1)[0]
    t_nat = min(timed(lambda: ops.lap_solve(small)) for _ in range(5))
    t_ref = timed(lambda: reference.lap_solve(small))
    print(f"unrelated, n = {args.reference_n}: reference twin / native {t_ref / t_nat:.0f}x")


if __name__ == "__main__":
    main()
