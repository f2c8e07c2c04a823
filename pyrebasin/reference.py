"""Pure-PyTorch twins of every native op: the oracle that tests and benchmarks compare against.

Each function has the same signature and semantics as its `pyrebasin.ops` counterpart.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["permute_multi", "corr_accumulate"]


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
