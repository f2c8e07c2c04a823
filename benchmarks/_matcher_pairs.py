"""The trained mnist1d model pairs of the matcher study (benchmarks/matchers.py): configurations and
training through `prb.train.train_zoo` (cached), so the study and its reruns share one set of weights.
"""
from __future__ import annotations

import argparse
import time

from pyrebasin.train import TrainConfig, train_zoo

# name -> (arch, arch kwargs, epochs, seed pairs). Modest epochs: the whole set trains in minutes on a
# small CPU box; the pairs still reach the usual accuracies of these models on mnist1d.
PAIRS = {
    "mlp128": ("mlp", dict(width=128, depth=3), 30, [(0, 1), (2, 3), (4, 5)]),
    "mlp256": ("mlp", dict(width=256, depth=3), 30, [(0, 1), (2, 3), (4, 5)]),
    "mlp512": ("mlp", dict(width=512, depth=3), 30, [(0, 1), (2, 3), (4, 5)]),
    "vgg_bn": ("vgg", dict(norm="bn"), 20, [(0, 1), (2, 3)]),
    "vgg_nonorm": ("vgg", dict(norm=None), 20, [(0, 1)]),
    "resnet20_ln_x1": ("resnet20", dict(norm="ln", width_multiplier=1), 15, [(0, 1)]),
    "resnet20_ln_x4": ("resnet20", dict(norm="ln", width_multiplier=4), 10, [(0, 1)]),
    "transformer": ("transformer", {}, 30, [(0, 1)]),
}


def config(name: str) -> TrainConfig:
    return TrainConfig(epochs=PAIRS[name][2])


def pairs(only: str | None = None):
    """Yields (pair name, model A, state A, state B) for every configured pair, training as needed."""
    for name, (arch, kw, _, seeds) in PAIRS.items():
        if only and only not in name:
            continue
        for sa, sb in seeds:
            model, a = train_zoo(arch, seed=sa, config=config(name), progress=False, **kw)
            _, b = train_zoo(arch, seed=sb, config=config(name), progress=False, **kw)
            yield f"{name}/{sa}-{sb}", model, a, b


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="train (and cache) the matcher-study pairs")
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    for pair, *_ in pairs(args.only):
        print(f"{pair}: trained by {time.perf_counter() - t0:.0f} s", flush=True)
