"""Pure-PyTorch twins of every native op: the oracle that tests and benchmarks compare against.

Each function has the same signature and semantics as its `pyrebasin.ops` counterpart.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import rng

__all__ = ["permute_multi", "corr_accumulate", "combine_batched"]


def permute_multi(
    tensors: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    owners: Sequence[int],
    axes: Sequence[int],
) -> list[torch.Tensor]:
    """index_select once per permuted axis (one full copy per axis), as Git Re-Basin does."""
    out = list(tensors)
    touched = [False] * len(tensors)
    for idx, owner, axis in zip(indices, owners, axes):
        out[owner] = out[owner].index_select(axis, idx)
        touched[owner] = True
    return [o if was else o.clone(memory_format=torch.contiguous_format) for o, was in zip(out, touched)]


def combine_batched(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    coef_base: Sequence[int],
    coef_div: Sequence[int],
    coef_mod: Sequence[int],
    distribution: str,
    params: Sequence[float],
    seed: int,
    sample_begin: int,
    num_samples: int,
) -> list[torch.Tensor]:
    """Materialises λ [K, *shape] per tensor (from `rng.coefficients`), then b + λ·(a − b) in
    float32 (float64 for float64 tensors), rounded once to the tensor's dtype."""
    if not (len(a) == len(b) == len(coef_base) == len(coef_div) == len(coef_mod)):
        raise ValueError("combine_batched: a, b, coef_base, coef_div and coef_mod must have the same length")
    if distribution not in rng.DISTRIBUTIONS or len(params) != rng.DISTRIBUTIONS[distribution][1]:
        raise ValueError(f"combine_batched: bad distribution {distribution!r} with params {list(params)}")
    samples = torch.arange(sample_begin, sample_begin + num_samples, dtype=torch.int64)
    out = []
    for i, (x, y, base, div, mod) in enumerate(zip(a, b, coef_base, coef_div, coef_mod)):
        if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
            raise ValueError(f"combine_batched: a[{i}] ({x.dtype}, {list(x.shape)}) and b[{i}] "
                             f"({y.dtype}, {list(y.shape)}) differ")
        if div < 1 or mod < 1 or base < 0:
            raise ValueError(f"combine_batched: tensor {i} has base={base}, div={div}, mod={mod}")
        opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
        idx = base + (torch.arange(x.numel()) // div) % mod
        uniq, inverse = torch.unique(idx, return_inverse=True)
        lam = rng.coefficients(distribution, params, seed, samples[:, None], uniq[None, :])
        lam = lam.to(opmath)[:, inverse].reshape(num_samples, *x.shape).to(x.device)
        xa, yb = x.to(opmath), y.to(opmath)
        out.append((yb + lam * (xa - yb)).to(x.dtype).contiguous())
    return out
def corr_accumulate(x, y, channel_dim, count, sum_x, sum_y, sum_xx, sum_yy, sum_xy) -> None:
    """Moves the channel dim last (the NHWC copy), converts to float64, and adds the moments."""
    def features_last(t):
        return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim]).to(torch.float64)

    if y is not None and (y.dim() != x.dim() or [s for i, s in enumerate(y.shape) if i != channel_dim % y.dim()]
                          != [s for i, s in enumerate(x.shape) if i != channel_dim % x.dim()]):
        raise ValueError(f"corr_accumulate: x {list(x.shape)} and y {list(y.shape)} must agree on every dim "
                         f"except channel_dim {channel_dim}")
    xd = features_last(x)
    yd = xd if y is None else features_last(y)
    if sum_xy.shape != (xd.shape[1], yd.shape[1]):
        raise ValueError(f"corr_accumulate: sum_xy must have shape {[xd.shape[1], yd.shape[1]]}, "
                         f"got {list(sum_xy.shape)}")
    count += xd.shape[0]
    sum_x += xd.sum(0)
    sum_y += yd.sum(0)
    sum_xx += (xd * xd).sum(0)
    sum_yy += (yd * yd).sum(0)
    sum_xy += xd.T @ yd
