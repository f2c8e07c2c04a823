"""combine_batched alone (through combine_states), as ratios measured in one run: native vs a plain torch
expression that materialises λ (torch.rand), vs the memory floor, and vs the reference backend.

The memory floor allocates and writes the K outputs (empty + fill_ of the same bytes): the op returns
fresh tensors, so first-touching the output pages is part of both. State: MLP 40-512x3-10 (float32).

Usage: python benchmarks/combine_batched.py [--threads 2] [--k 256] [--repeat 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch

import pyrebasin as prb

try:
    from ._timing import best_of
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import best_of


def pair(width=512, depth=3, seed=0):
    torch.manual_seed(seed)
    a = {k: v.clone() for k, v in prb.zoo.MLP(40, width, depth).state_dict().items()}
    torch.manual_seed(seed + 1)
    b = {k: v.clone() for k, v in prb.zoo.MLP(40, width, depth).state_dict().items()}
    return a, b


def run(repeat: int, k: int) -> dict:
    a, b = pair()
    keys = list(a)
    d = sum(a[key].numel() for key in keys)
    t_floor = best_of(lambda: [torch.empty(k, *a[key].shape).fill_(1.0) for key in keys], repeat)
    g = torch.Generator().manual_seed(0)

    def plain():
        return [b[key] + torch.rand((k, *a[key].shape), generator=g) * (a[key] - b[key]) for key in keys]

    t_plain = best_of(plain, repeat)
    res = {"K": k, "params": d, "output_bytes": k * d * 4, "threads": torch.get_num_threads(),
           "floor_alloc_fill_s": t_floor, "torch_rand_expr_s": t_plain, "torch_ratio_to_floor": t_plain / t_floor}
    spec = prb.zoo.MLP(40, 512, 3).permutation_spec()
    for gran in ("element", "neuron", "global"):
        c = prb.sample_coefficients(spec, k, "uniform", gran, seed=0, state=a)
        t = best_of(lambda: prb.combine_states(a, b, c), repeat)
        res[f"native_{gran}_s"] = t
        res[f"native_{gran}_ratio_to_floor"] = t / t_floor
        res[f"native_{gran}_speedup_vs_torch_rand_expr"] = t_plain / t
        # The reference materialises λ (int64 Philox in torch ops): compared on 8 samples only.
        c8 = prb.sample_coefficients(spec, 8, "uniform", gran, seed=0, state=a)
        t_nat = best_of(lambda: prb.combine_states(a, b, c8), repeat)
        with prb.use_backend("reference"):
            t_ref = best_of(lambda: prb.combine_states(a, b, c8), 1)
        res[f"reference_over_native_{gran}_K8"] = t_ref / t_nat
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--json")
    args = p.parse_args()
    if not prb.native_available():
        raise SystemExit("native extension not built: nothing to compare")
    torch.set_num_threads(args.threads)
    res = run(args.repeat, args.k)
    print(f"combine_batched, K = {res['K']} of MLP 3x512 ({res['output_bytes'] / 2**20:.0f} MB out), "
          f"{res['threads']} threads; torch.rand expression / floor {res['torch_ratio_to_floor']:.2f}x")
    print(f"{'granularity':12s} {'native/floor':>13s} {'torch/native':>13s} {'ref/native (K=8)':>17s}")
    for gran in ("element", "neuron", "global"):
        print(f"{gran:12s} {res[f'native_{gran}_ratio_to_floor']:13.2f} "
              f"{res[f'native_{gran}_speedup_vs_torch_rand_expr']:13.2f} {res[f'reference_over_native_{gran}_K8']:17.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
