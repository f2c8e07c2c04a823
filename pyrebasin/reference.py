"""Pure-PyTorch twins of every native op: the oracle that tests and benchmarks compare against.

Each function has the same signature and semantics as its `pyrebasin.ops` counterpart.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["permute_multi"]


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
