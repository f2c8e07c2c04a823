"""Offline datasets as tensors, cached under the user cache dir: mnist1d (procedural) and sklearn digits.

Never downloads: mnist1d's generator runs locally; sklearn ships the digits.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .fileio import atomic_torch_save

__all__ = ["cache_dir", "mnist1d", "digits", "load", "DATASETS"]

Dataset = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def cache_dir() -> Path:
    """`$PYREBASIN_CACHE`, else `$XDG_CACHE_HOME/pyrebasin`, else `~/.cache/pyrebasin`."""
    root = os.environ.get("PYREBASIN_CACHE")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pyrebasin")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached(name: str, config: dict, build) -> Dataset:
    key = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}.pt"
    if path.exists():
        try:
            return tuple(torch.load(path, weights_only=True))
        except Exception:  # a torn or stale file: rebuild it
            path.unlink(missing_ok=True)
    data = build()
    atomic_torch_save(list(data), path)
    return data


def mnist1d(*, num_samples: int = 5000, seed: int = 42) -> Dataset:
    """MNIST-1D (Greydanus 2020) from its procedural generator: x [N, 40] float32, y [N] int64.

    The default is the package's standard 4000 train / 1000 test split.
    """
    def build():
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:
            raise ImportError("prb.data.mnist1d() needs the `mnist1d` package: pip install mnist1d") from exc
        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, seed
        d = make_dataset(args)  # local generator; its download path is never called
        return (torch.as_tensor(d["x"], dtype=torch.float32), torch.as_tensor(d["y"], dtype=torch.long),
                torch.as_tensor(d["x_test"], dtype=torch.float32), torch.as_tensor(d["y_test"], dtype=torch.long))

    return _cached("mnist1d", {"num_samples": num_samples, "seed": seed, "v": 1}, build)


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits: x [N, 8, 8] float32 in [0, 1], y [N] int64; seeded split."""
    def build():
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise ImportError("prb.data.digits() needs scikit-learn: pip install scikit-learn") from exc
        d = load_digits()
        x = torch.as_tensor(d.images, dtype=torch.float32) / 16.0
        y = torch.as_tensor(d.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_test = int(round(len(y) * test_fraction))
        test, train = order[:n_test], order[n_test:]
        return x[train], y[train], x[test], y[test]

    return _cached("digits", {"test_fraction": test_fraction, "seed": seed, "v": 1}, build)


DATASETS = {"mnist1d": mnist1d, "digits": digits}


def load(name: str) -> Dataset:
    """A dataset by name ("mnist1d" or "digits")."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]()
