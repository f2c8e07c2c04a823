"""permute_multi through apply_permutation: native vs reference vs clone() of the same dict, in one run.

Usage: python benchmarks/permute_multi.py [--threads 2] [--repeat 15] [--json out.json]
Cases: a ResNet20x8 BatchNorm state dict, and a transformer-block-shaped dict (attention 4096 + a
4096/11008 MLP, LLaMA-style). Floor: clone() of every tensor (one read + one write per byte).
Fresh outputs cost page faults on both sides (whether glibc reuses freed memory varies from run to
run); native asks for huge pages on outputs >= 4 MiB, PYREBASIN_NO_HUGEPAGES=1 turns that off.
"""
from __future__ import annotations

import argparse
import json

import torch

import pyrebasin as prb
from pyrebasin.spec import Blocked, PermutationSpec

try:
    from ._timing import best_of
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import best_of


def transformer_block(d=4096, hidden=11008, heads=32, dtype=torch.float32):
    hd = d // heads
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(dtype)  # noqa: E731
    state = {"attn_norm.weight": mk(d), "q.weight": mk(d, d), "k.weight": mk(d, d), "v.weight": mk(d, d),
             "o.weight": mk(d, d), "mlp_norm.weight": mk(d), "gate.weight": mk(hidden, d),
             "up.weight": mk(hidden, d), "down.weight": mk(d, hidden)}
    qk = Blocked((heads, hd), ("P_heads", None))  # RoPE: whole heads only for q/k
    vo = Blocked((heads, hd), ("P_heads", "P_vo"))
    spec = PermutationSpec({"attn_norm.weight": ("P_res",), "q.weight": (qk, "P_res"), "k.weight": (qk, "P_res"),
                            "v.weight": (vo, "P_res"), "o.weight": ("P_res", vo), "mlp_norm.weight": ("P_res",),
                            "gate.weight": ("P_mlp", "P_res"), "up.weight": ("P_mlp", "P_res"),
                            "down.weight": ("P_res", "P_mlp")})
    return spec, state


def resnet20x8():
    model = prb.zoo.ResNet20(8, norm="bn", conv_dim=2)
    return model.permutation_spec(), {k: v.clone() for k, v in model.state_dict().items()}


def run(repeat: int) -> list[dict]:
    rows = []
    for name, (spec, state) in [("resnet20x8_bn", resnet20x8()), ("transformer_block_4096_11008", transformer_block())]:
        perms = prb.random_permutation(spec, state, 0)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        t_clone = best_of(lambda: {k: v.clone() for k, v in state.items()}, repeat)
        t_native = best_of(lambda: prb.apply_permutation(spec, perms, state), repeat)
        with prb.use_backend("reference"):
            t_ref = best_of(lambda: prb.apply_permutation(spec, perms, state), repeat)
        rows.append({"case": name, "MB": nbytes / 2**20, "clone_s": t_clone, "native_s": t_native,
                     "reference_s": t_ref, "native/clone": t_native / t_clone,
                     "reference/native": t_ref / t_native, "threads": torch.get_num_threads()})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not prb.native_available():
        raise SystemExit("native extension not built: nothing to compare")
    rows = run(args.repeat)
    print(f"{'case':30s} {'MB':>8s} {'native/clone':>13s} {'ref/native':>11s}   (clone, native, reference ms)")
    for r in rows:
        print(f"{r['case']:30s} {r['MB']:8.1f} {r['native/clone']:13.2f} {r['reference/native']:11.2f}   "
              f"({1e3 * r['clone_s']:.1f}, {1e3 * r['native_s']:.1f}, {1e3 * r['reference_s']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
