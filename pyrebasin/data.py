"""Offline datasets as tensors, cached under the user cache dir: mnist1d (procedural), sklearn digits and
a byte-level text corpus (the running interpreter's standard-library source).

Never downloads: mnist1d's generator runs locally; sklearn ships the digits; every Python ships its stdlib.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path

import torch

from .fileio import atomic_torch_save

__all__ = ["cache_dir", "mnist1d", "digits", "load", "DATASETS", "pystdlib", "stdlib_files", "lm_windows"]

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


def stdlib_files(test_fraction: float = 0.1) -> tuple[list[Path], list[Path]]:
    """(train files, test files): the top-level `*.py` files of the running interpreter's standard
    library (`sysconfig.get_paths()["stdlib"]`), sorted by name; a file is a test file when the SHA-1 of
    its name falls in the first `test_fraction` of the hash range (the same split on every machine
    with the same Python, whatever files are added later)."""
    if not (isinstance(test_fraction, float) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction={test_fraction!r} must be a float in (0, 1)")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda f: f.name)
    if not files:
        raise ValueError(f"no *.py files in the standard library folder {root}")
    test = [f for f in files if int(hashlib.sha1(f.name.encode()).hexdigest(), 16) / 16**40 < test_fraction]
    return [f for f in files if f not in test], test


def pystdlib(*, test_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A byte-level text corpus: (train, test) uint8 streams (token ids 0..255) of the standard
    library's top-level `*.py` sources (`stdlib_files`), each file's bytes followed by one NUL byte
    (a separator no source contains). Cached per Python version and file list."""
    train, test = stdlib_files(test_fraction)

    def build():
        def stream(files):
            return torch.frombuffer(bytearray(b"".join(f.read_bytes() + b"\0" for f in files)), dtype=torch.uint8)
        return stream(train), stream(test)

    names = hashlib.sha1("\n".join(f.name for f in train + test).encode()).hexdigest()[:12]
    return _cached("pystdlib", {"python": platform.python_version(), "files": names,
                                "test_fraction": test_fraction, "v": 1}, build)


def lm_windows(stream: torch.Tensor, seq_len: int, n: int | None = None, *,
               seed: int | None = None) -> torch.Tensor:
    """Token windows [n, seq_len + 1] (int64) of a 1-D id stream: input ids are `w[:, :-1]`, next-token
    targets `w[:, 1:]`. `seed=None`: `n` non-overlapping windows spread evenly over the stream (every
    window that fits, consecutively, when `n` is None), so a few windows still sample every file; an
    int: `n` windows at seeded random offsets."""
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        raise ValueError(f"stream must be a 1-D tensor of token ids, got {getattr(stream, 'shape', stream)!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len < stream.numel():
        raise ValueError(f"seq_len={seq_len!r} must be an int in [1, {stream.numel()})")
    span = seq_len + 1
    if seed is None:
        fit = stream.numel() // span
        n = fit if n is None else n
        if not 0 < n <= fit:
            raise ValueError(f"n={n!r}: the stream holds {fit} windows of {span} tokens")
        pick = torch.div(torch.arange(n) * fit, n, rounding_mode="floor")
        return stream[:fit * span].view(fit, span)[pick].long()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int with seed=")
    starts = torch.randint(0, stream.numel() - span + 1, (n,), generator=torch.Generator().manual_seed(seed))
    return stream[starts[:, None] + torch.arange(span)].long()


DATASETS = {"mnist1d": mnist1d, "digits": digits}


def load(name: str) -> Dataset:
    """A dataset by name ("mnist1d" or "digits")."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]()
