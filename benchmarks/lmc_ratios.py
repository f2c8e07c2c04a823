"""Interpolation-curve evaluation: vmap over stacked t (several chunk sizes) vs a loop over t, as
ratios measured in one run. Untrained zoo models (timing only); `python benchmarks/lmc_ratios.py`."""
from __future__ import annotations

import argparse

import torch

import pyrebasin as prb
from pyrebasin.lmc import interpolate

try:
    from ._timing import best_of
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ts", type=int, default=25)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 40, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    models = {"mlp 128x3": prb.zoo.MLP(40, 128, 3), "mlp 512x3": prb.zoo.MLP(40, 512, 3),
              "vgg-bn": prb.zoo.VGG(), "resnet20-ln": prb.zoo.ResNet20(norm="ln")}
    print(f"threads={args.threads} ts={args.ts} samples={args.samples}; time relative to the loop (lower is better)")
    for name, model in models.items():
        torch.manual_seed(0)
        a = {k: v.clone() for k, v in model.state_dict().items()}
        b = {k: (v + 0.1 * torch.randn_like(v)) if v.is_floating_point() else v.clone() for k, v in a.items()}
        run = lambda **kw: interpolate(model, a, b, (x, y), args.ts, **kw)  # noqa: E731
        loop = best_of(lambda: run(vmap_ts=False), args.repeat)
        cells = [f"loop {loop:.3f}s"]
        for chunk in (4, 8, 25):
            cells.append(f"vmap/{chunk} {best_of(lambda: run(vmap_ts=True, chunk=chunk), args.repeat) / loop:.2f}x")
        print(f"{name:12s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
