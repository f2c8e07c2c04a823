"""Connectivity-map cost: the N(N−1)/2 pairwise curves of `maps.pairwise_barriers` (one batched call per
pair) against the floor (the same number of models in one batched call) and a loop of `prb.interpolate`
per pair, as ratios measured in one run. Untrained zoo MLPs; `python benchmarks/connectivity_ratios.py`."""
from __future__ import annotations

import argparse
import itertools

import torch

import pyrebasin as prb
from pyrebasin.maps import pairwise_barriers

try:
    from ._timing import best_of_clocks
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import best_of_clocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--ts", type=int, default=11)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 40, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    pairs = args.n * (args.n - 1) // 2
    print(f"threads={args.threads} N={args.n} ({pairs} curves) ts={args.ts} samples={args.samples}; "
          "CPU time relative to the floor (lower is better)")
    for width in (128, 512):
        floor, mapped, loop = measure(width, args, x, y)
        print(f"mlp {width}x3: floor {floor:.3f}s CPU | pairwise_barriers {mapped / floor:.2f}x | "
              f"interpolate loop {loop / floor:.2f}x")


def measure(width: int, args, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """CPU seconds of: the floor, the map's pairwise curves, the interpolate loop."""
    pairs = args.n * (args.n - 1) // 2
    model = prb.zoo.MLP(40, width, 3)
    states = []
    for s in range(args.n):
        torch.manual_seed(s)
        states.append({k: v.detach().clone() for k, v in prb.zoo.MLP(40, width, 3).state_dict().items()})
    ts = torch.linspace(0, 1, args.ts).tolist()
    floor = best_of_clocks(lambda: prb.evaluate_combinations(model, states[1], states[0], ts * pairs, (x, y),
                                                             chunk=args.ts), args.repeat)[1]
    mapped = best_of_clocks(lambda: pairwise_barriers(model, states, (x, y), ts=args.ts), args.repeat)[1]
    loop = best_of_clocks(lambda: [prb.interpolate(model, states[i], states[j], (x, y), ts=args.ts)
                                   for i, j in itertools.combinations(range(args.n), 2)], args.repeat)[1]
    return floor, mapped, loop

if __name__ == "__main__":
    main()
