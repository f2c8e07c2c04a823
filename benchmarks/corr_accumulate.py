"""corr_accumulate (streaming correlation through CrossMoments), measured in one run: native against the
bare GEMM floor (torch.mm of the same shapes), the reference backend, and concatenate + torch.corrcoef,
with the peak memory of each (every method runs in its own subprocess; ru_maxrss above its baseline).

    PYTHONPATH=$PWD python benchmarks/corr_accumulate.py [--samples 50000] [--units 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches(args, conv: bool):
    """Deterministic batches (the same in every subprocess)."""
    g = torch.Generator().manual_seed(0)
    n, per = args.units, args.batch
    for start in range(0, args.samples, per):
        b = min(per, args.samples - start)
        if conv:  # [B, C, positions] with channel_dim=1: positions count as samples
            pos = args.positions
            x = torch.randn(max(1, b // pos), n, pos, generator=g)
        else:
            x = torch.randn(b, n, generator=g)
        y = 0.5 * x + torch.randn(x.shape, generator=g)
        yield torch.relu(x), y


def run_method(method: str, args) -> dict:
    import pyrebasin as prb
    from pyrebasin.moments import CrossMoments

    torch.set_num_threads(args.threads)
    conv = method.endswith("_conv")
    cd = 1 if conv else -1
    # Every method gets the same pre-generated batches; memory is counted above this baseline.
    data = list(batches(args, conv))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if method.startswith(("native", "reference")):
        with prb.use_backend("native" if method.startswith("native") else "reference"):
            m = CrossMoments(args.units, args.units)
            for x, y in data:
                m.update(x, y, channel_dim=cd)
            c = m.corr()
    elif method.startswith("corrcoef"):
        xs = torch.cat([x.movedim(cd, -1).reshape(-1, args.units) for x, _ in data]).double()
        ys = torch.cat([y.movedim(cd, -1).reshape(-1, args.units) for _, y in data]).double()
        c = torch.corrcoef(torch.cat([xs, ys], 1).T)[: args.units, args.units:]
    elif method in ("mm64", "mm32"):
        acc = None
        dtype = torch.float64 if method == "mm64" else torch.float32
        pre = [(x.to(dtype), y.to(dtype)) for x, y in data]
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        for x, y in pre:
            p = torch.mm(x.T, y)
            acc = p if acc is None else acc.add_(p)
        c = acc
    else:
        raise ValueError(method)
    dt = time.perf_counter() - t
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"time": dt, "peak_mb": peak, "checksum": float(c.double().abs().sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--units", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--positions", type=int, default=49)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args)))
        return
    methods = ["mm32", "mm64", "native", "reference", "corrcoef", "native_conv", "reference_conv"]
    res = {}
    for m in methods:
        cmd = [sys.executable, __file__, "--method", m] + sum(
            ([f"--{k}", str(getattr(args, k))] for k in ("samples", "units", "batch", "positions", "threads")), [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        if proc.returncode != 0:
            print(f"{m}: failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        res[m] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{m:15s} {res[m]['time']:8.3f} s   peak +{res[m]['peak_mb']:8.1f} MB")
    nat = res.get("native", {}).get("time")
    print(f"\nN={args.samples} samples, n={args.units} units, batches of {args.batch}, threads={args.threads}")
    if nat:
        for name, key in [("bare torch.mm float32 (floor)", "mm32"), ("bare torch.mm float64 (floor)", "mm64")]:
            if key in res:
                print(f"native / {name}: {nat / res[key]['time']:.2f}x")
        for name, key in [("reference backend", "reference"), ("concatenate + torch.corrcoef", "corrcoef")]:
            if key in res:
                print(f"{name} / native: {res[key]['time'] / nat:.2f}x  (peak {res[key]['peak_mb']:.0f} MB vs "
                      f"{res['native']['peak_mb']:.0f} MB)")
    if "native_conv" in res and "reference_conv" in res:
        print(f"conv [B, {args.units}, {args.positions}] channel_dim=1: reference / native "
              f"{res['reference_conv']['time'] / res['native_conv']['time']:.2f}x (peak "
              f"{res['reference_conv']['peak_mb']:.0f} MB vs {res['native_conv']['peak_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
