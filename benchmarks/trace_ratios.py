"""trace_spec vs the peer tracer (rebasin 0.0.47), measured in one run on zoo models (issue #6):

- invariance: max |Δ output| of a model after permuting it by its spec's groups. Ours: the traced
  spec, random permutations (check_spec, eval mode). Peer: rebasin's PermutationCoordinateDescent
  aligns B to A with the spec its torchview tracer built, and we measure how much *B's own function*
  changed (a correct spec changes nothing; 0 up to float error);
- time: trace_spec (fx and export front ends) against the model's forward pass.

Usage: python benchmarks/trace_ratios.py [--json out.json]. The peer runs in a subprocess with its
dir (benchmarks/install_peers.sh; PYREBASIN_PEER_DIR) on PYTHONPATH only there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import pyrebasin as prb
from pyrebasin.zoo import MLP, VGG, ResNet20, Transformer

CASES = {
    "mlp_bn": (lambda: MLP(in_features=12, width=24, depth=2, classes=5, norm="bn"), (4, 12)),
    "vgg1d_bn": (lambda: VGG(conv_dim=1, input_size=16, cfg=(8, "M", 12, "M"), hidden=16), (3, 16)),
    "resnet20_bn": (lambda: ResNet20(norm="bn", blocks_per_stage=1), (3, 16)),
    "transformer": (lambda: Transformer(seq_len=8, patch=2, d_model=16, heads=4, layers=1), (3, 8)),
}
PEER_DIR = os.environ.get("PYREBASIN_PEER_DIR", str(Path(__file__).resolve().parents[1] / ".venv-rebasin" / "site"))


def models(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    a, b = make(), make()
    g = torch.Generator().manual_seed(1)
    for m in (a, b):  # jitter so BatchNorm's ones/zeros cannot hide a missing permutation
        m.load_state_dict({k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point()
                           else v for k, v in m.state_dict().items()})
        m.eval()
    return a, b, torch.randn(shape, generator=g)


def peer(name) -> dict:
    from rebasin import PermutationCoordinateDescent
    a, b, x = models(name)
    with torch.no_grad():
        before = b(x).clone()
    torch.manual_seed(0)
    pcd = PermutationCoordinateDescent(a, b, x)
    pcd.rebasin()
    with torch.no_grad():
        return {"delta": float((b(x) - before).abs().max())}


def ours(name) -> dict:
    _, b, x = models(name)
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(10):
            b(x)
    fwd = (time.perf_counter() - t) / 10
    out = {"forward_s": fwd}
    for frontend in ("fx", "export"):
        t = time.perf_counter()
        try:
            spec = prb.trace_spec(b, x, frontend=frontend)
            out[f"{frontend}_s"] = time.perf_counter() - t
        except ValueError:
            out[f"{frontend}_s"] = None
    out["delta"] = prb.check_spec(b, spec, x, modes=("eval",), randomize=False).max_abs_diff["eval"]
    out["groups"] = len(spec.perm_names)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.peer:
        print(json.dumps(peer(args.peer)))
        return
    prb.trace_spec(*models("mlp_bn")[1:], frontend="export")  # warm-up of torch.export
    rows = {}
    for name in CASES:
        row = ours(name)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([PEER_DIR, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, __file__, "--peer", name], env=env,
                              capture_output=True, text=True)
        row["peer_delta"] = json.loads(proc.stdout.strip().splitlines()[-1])["delta"] \
            if proc.returncode == 0 else f"peer failed: {proc.stderr.strip().splitlines()[-1:]}"
        rows[name] = row
    print("| model | groups | ours max|Δ out| | rebasin max|Δ out| | trace fx / forward | "
          "trace export / forward |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        fx = f"{r['fx_s'] / r['forward_s']:.0f}x" if r["fx_s"] else "n/a"
        pd = f"{r['peer_delta']:.2e}" if isinstance(r["peer_delta"], float) else r["peer_delta"]
        print(f"| {name} | {r['groups']} | {r['delta']:.2e} | {pd} | {fx} | "
              f"{r['export_s'] / r['forward_s']:.0f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
