"""Thin typed wrappers over the native ops `torch.ops.pyrebasin.*`, with fake (meta) kernels.

Each wrapper runs the native kernel when the backend is "native" and the device has one, else the
pure-PyTorch twin in `pyrebasin.reference`. Importing this module never fails when `_C` is missing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from ._backend import native_available, use_native

__all__ = ["permute_multi"]


def permute_multi(
    tensors: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    owners: Sequence[int],
    axes: Sequence[int],
) -> list[torch.Tensor]:
    """Gather every tensor along all of its permuted axes in one pass.

    `indices[k]` (int64, length `tensors[owners[k]].size(axes[k])`) is applied along axis `axes[k]`
    of `tensors[owners[k]]`: the result equals `index_select` applied once per axis. Outputs are new
    contiguous tensors; inputs may be non-contiguous and of any dtype.
    """
    if tensors and use_native("permute_multi", tensors[0].device):
        return torch.ops.pyrebasin.permute_multi(list(tensors), list(indices), list(owners), list(axes))
    return reference.permute_multi(tensors, indices, owners, axes)


if native_available():

    @torch.library.register_fake("pyrebasin::permute_multi")
    def _permute_multi_fake(tensors, indices, owners, axes):
        torch._check(len(indices) == len(owners) == len(axes), lambda: "indices/owners/axes lengths differ")
        for idx, owner, axis in zip(indices, owners, axes):
            torch._check(0 <= owner < len(tensors), lambda: f"owner {owner} out of range")
            torch._check(idx.dim() == 1 and idx.dtype == torch.long, lambda: "indices must be 1-D int64")
            torch._check(idx.shape[0] == tensors[owner].shape[axis], lambda: "index length != axis size")
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
