"""Thin typed wrappers over the native ops `torch.ops.pyrebasin.*`, with fake (meta) kernels.

Each wrapper runs the native kernel when the backend is "native" and the device has one, else the
pure-PyTorch twin in `pyrebasin.reference`. Importing this module never fails when `_C` is missing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from ._backend import native_available, use_native

__all__ = ["permute_multi", "corr_accumulate", "lap_solve", "combine_batched"]


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
    """K = `num_samples` combinations `b[i] + λ_k ⊙ (a[i] − b[i])`, each output [K, *a[i].shape].

    Element e (row-major) of tensor i uses coefficient index `coef_base[i] + (e // coef_div[i]) %
    coef_mod[i]`; λ for (seed, sample_begin + k, index) comes from the counter-based RNG of
    `pyrebasin.rng` (distribution "constant"(t), "uniform"(low, high), "bernoulli"(p),
    "gaussian"(mean, std, clip_low, clip_high) or "beta"(alpha, beta)) and is never stored.
    """
    if a and use_native("combine_batched", a[0].device):
        return torch.ops.pyrebasin.combine_batched(
            list(a), list(b), [int(v) for v in coef_base], [int(v) for v in coef_div],
            [int(v) for v in coef_mod], str(distribution), [float(p) for p in params], int(seed),
            int(sample_begin), int(num_samples))
    return reference.combine_batched(a, b, coef_base, coef_div, coef_mod, distribution, params, seed,
                                     sample_begin, num_samples)
def corr_accumulate(
    x: torch.Tensor,
    y: torch.Tensor | None,
    channel_dim: int,
    count: torch.Tensor,
    sum_x: torch.Tensor,
    sum_y: torch.Tensor,
    sum_xx: torch.Tensor,
    sum_yy: torch.Tensor,
    sum_xy: torch.Tensor,
) -> None:
    """Add one batch to float64 moment accumulators (in place): count += samples, Σx, Σy, Σx², Σy²
    and Σxyᵀ [C_x, C_y]. Features lie along `channel_dim` of x and y (which agree on every other
    dim); every other position (batch, conv position, token) is a sample. y=None: x with itself.
    Conv maps are read in place (no NHWC copy); Σxyᵀ is one float64 BLAS GEMM per chunk."""
    if use_native("corr_accumulate", x.device):
        torch.ops.pyrebasin.corr_accumulate(x, y, channel_dim, count, sum_x, sum_y, sum_xx, sum_yy, sum_xy)
        return
    reference.corr_accumulate(x, y, channel_dim, count, sum_x, sum_y, sum_xx, sum_yy, sum_xy)


def lap_solve(
    cost: torch.Tensor, v: torch.Tensor | None = None, col4row: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of a square float64 CPU cost: (col4row int64 [n], column duals v
    float64 [n], number of augmenting paths). Passing a previous (v, col4row) warm-starts the solve:
    rows whose old column is still tight keep it and only the others are augmented (same optimum)."""
    if use_native("lap_solve", cost.device):
        return torch.ops.pyrebasin.lap_solve(cost, v, col4row)
    return reference.lap_solve(cost, v, col4row)


if native_available():

    @torch.library.register_fake("pyrebasin::permute_multi")
    def _permute_multi_fake(tensors, indices, owners, axes):
        torch._check(len(indices) == len(owners) == len(axes), lambda: "indices/owners/axes lengths differ")
        for idx, owner, axis in zip(indices, owners, axes):
            torch._check(0 <= owner < len(tensors), lambda: f"owner {owner} out of range")
            torch._check(idx.dim() == 1 and idx.dtype == torch.long, lambda: "indices must be 1-D int64")
            torch._check(idx.shape[0] == tensors[owner].shape[axis], lambda: "index length != axis size")
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]

    @torch.library.register_fake("pyrebasin::combine_batched")
    def _combine_batched_fake(a, b, coef_base, coef_div, coef_mod, distribution, params, seed,
                              sample_begin, num_samples):
        torch._check(len(a) == len(b) == len(coef_base) == len(coef_div) == len(coef_mod),
                     lambda: "a/b/coef_base/coef_div/coef_mod lengths differ")
        torch._check(num_samples >= 0, lambda: f"num_samples must be >= 0, got {num_samples}")
        for x, y in zip(a, b):
            torch._check(x.shape == y.shape and x.dtype == y.dtype, lambda: "a[i] and b[i] differ")
        return [x.new_empty((num_samples, *x.shape)) for x in a]

    @torch.library.register_fake("pyrebasin::corr_accumulate")
    def _corr_accumulate_fake(x, y, channel_dim, count, sum_x, sum_y, sum_xx, sum_yy, sum_xy):
        torch._check(x.dim() >= 1, lambda: "corr_accumulate: x must have at least one dim")
        cd = channel_dim % x.dim()
        torch._check(sum_x.shape == (x.shape[cd],), lambda: "corr_accumulate: sum_x shape")
        c_y = (y if y is not None else x).shape[cd]
        torch._check(sum_xy.shape == (x.shape[cd], c_y), lambda: "corr_accumulate: sum_xy shape")
        for t in (count, sum_x, sum_y, sum_xx, sum_yy, sum_xy):
            torch._check(t.dtype == torch.float64, lambda: "corr_accumulate: accumulators must be float64")
        return None

    @torch.library.register_fake("pyrebasin::lap_solve")
    def _lap_solve_fake(cost, v, col4row):
        torch._check(cost.dim() == 2 and cost.shape[0] == cost.shape[1], lambda: "lap_solve: cost must be square")
        torch._check(cost.dtype == torch.float64, lambda: "lap_solve: cost must be float64")
        n = cost.shape[0]
        return (cost.new_empty(n, dtype=torch.long), cost.new_empty(n), cost.new_empty((), dtype=torch.long))
