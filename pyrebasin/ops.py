"""Thin typed wrappers over the native ops `torch.ops.pyrebasin.*`, each with its fake (meta) kernel.

Each wrapper runs the native kernel when the backend is "native" and the device has one, else the
pure-PyTorch twin in `pyrebasin.reference`. Importing this module never fails when `_C` is missing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from ._backend import native_available, use_native

__all__ = ["permute_multi", "corr_accumulate", "lap_solve", "combine_batched"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DISTRIBUTIONS = {"constant": 1, "uniform": 2, "bernoulli": 1, "gaussian": 4, "beta": 2}


def _register_fake(op: str):
    """`torch.library.register_fake("pyrebasin::<op>")` when the extension loaded (else no schema)."""
    def register(fn):
        return torch.library.register_fake(f"pyrebasin::{op}")(fn) if native_available() else fn
    return register


def permute_multi(
    tensors: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    owners: Sequence[int],
    axes: Sequence[int],
) -> list[torch.Tensor]:
    """Gather every tensor along all of its permuted axes in one pass.

    `indices[k]` (int64, length `tensors[owners[k]].size(axes[k])`) is applied along axis `axes[k]`
    of `tensors[owners[k]]`: the result equals `index_select` applied once per axis. Outputs are new
    contiguous tensors; inputs may be non-contiguous, of any dtype and any rank.
    """
    if tensors and use_native("permute_multi", tensors[0].device):
        return torch.ops.pyrebasin.permute_multi(list(tensors), list(indices), list(owners), list(axes))
    return reference.permute_multi(tensors, indices, owners, axes)


@_register_fake("permute_multi")
def _permute_multi_fake(tensors, indices, owners, axes):
    torch._check(len(indices) == len(owners) == len(axes), lambda: (
        f"permute_multi: indices, owners and axes must have the same length, got {len(indices)}, "
        f"{len(owners)} and {len(axes)}"))
    for t, x in enumerate(tensors):
        torch._check(x.element_size() in (1, 2, 4, 8, 16), lambda: (
            f"permute_multi: tensors[{t}] has unsupported element size {x.element_size()} ({x.dtype})"))
    permuted = set()
    for k, (idx, owner, axis) in enumerate(zip(indices, owners, axes)):
        torch._check(0 <= owner < len(tensors), lambda: (
            f"permute_multi: owners[{k}] = {owner} is out of range for {len(tensors)} tensors"))
        x = tensors[owner]
        torch._check(x.dim() > 0, lambda: f"permute_multi: tensors[{owner}] is a scalar and has no axis {axis}")
        torch._check(-x.dim() <= axis < x.dim(), lambda: (
            f"permute_multi: axes[{k}] = {axis} is out of range for tensors[{owner}] of shape {list(x.shape)}"))
        a = axis % x.dim()
        torch._check((owner, a) not in permuted, lambda: f"permute_multi: tensors[{owner}] axis {a} is permuted twice")
        permuted.add((owner, a))
        torch._check(idx.dtype == torch.long, lambda: f"permute_multi: indices[{k}] must be int64, got {idx.dtype}")
        torch._check(idx.dim() == 1 and idx.shape[0] == x.shape[a], lambda: (
            f"permute_multi: indices[{k}] must have shape [{x.shape[a]}] (tensors[{owner}].size({a})), "
            f"got {list(idx.shape)}"))
        torch._check(idx.device == x.device, lambda: (
            f"permute_multi: indices[{k}] is on {idx.device} but tensors[{owner}] is on {x.device}"))
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


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


@_register_fake("combine_batched")
def _combine_batched_fake(a, b, coef_base, coef_div, coef_mod, distribution, params, seed,
                          sample_begin, num_samples):
    lengths = [len(a), len(b), len(coef_base), len(coef_div), len(coef_mod)]
    torch._check(len(set(lengths)) == 1, lambda: (
        f"combine_batched: a, b, coef_base, coef_div and coef_mod must have the same length, got {lengths}"))
    torch._check(num_samples >= 0, lambda: f"combine_batched: num_samples must be >= 0, got {num_samples}")
    torch._check(0 <= sample_begin and sample_begin + num_samples <= 2**32, lambda: (
        f"combine_batched: samples [{sample_begin}, {sample_begin + num_samples}) must lie in [0, 2^32)"))
    torch._check(distribution in _DISTRIBUTIONS, lambda: (
        f"combine_batched: unknown distribution {distribution!r}; expected one of {sorted(_DISTRIBUTIONS)}"))
    torch._check(len(params) == _DISTRIBUTIONS[distribution], lambda: (
        f"combine_batched: distribution {distribution!r} takes {_DISTRIBUTIONS[distribution]} params, "
        f"got {len(params)}"))
    for i, (x, y) in enumerate(zip(a, b)):
        torch._check(x.shape == y.shape, lambda: (
            f"combine_batched: a[{i}] has shape {list(x.shape)} but b[{i}] has shape {list(y.shape)}"))
        torch._check(x.dtype == y.dtype, lambda: f"combine_batched: a[{i}] is {x.dtype} but b[{i}] is {y.dtype}")
        torch._check(x.dtype in _FLOATS, lambda: (
            f"combine_batched: a[{i}] must have dtype float32, float64, float16 or bfloat16, got {x.dtype}"))
        torch._check(coef_base[i] >= 0 and coef_div[i] >= 1 and coef_mod[i] >= 1, lambda: (
            f"combine_batched: tensor {i} has coef_base={coef_base[i]}, coef_div={coef_div[i]}, "
            f"coef_mod={coef_mod[i]}; expected base >= 0, div >= 1, mod >= 1"))
    return [x.new_empty((num_samples, *x.shape)) for x in a]


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


@_register_fake("corr_accumulate")
def _corr_accumulate_fake(x, y, channel_dim, count, sum_x, sum_y, sum_xx, sum_yy, sum_xy):
    torch._check(x.dim() >= 1, lambda: "corr_accumulate: x must have at least one dim, got a scalar")
    torch._check(-x.dim() <= channel_dim < x.dim(), lambda: (
        f"corr_accumulate: channel_dim {channel_dim} is out of range for x of shape {list(x.shape)}"))
    cd = channel_dim % x.dim()
    for name, t in (("x", x), ("y", y)):
        torch._check(t is None or t.dtype in _FLOATS, lambda: (
            f"corr_accumulate: {name} must have dtype float32, float64, float16 or bfloat16, got {t.dtype}"))
    c_y = x.shape[cd]
    if y is not None:
        torch._check(y.device == x.device, lambda: f"corr_accumulate: y is on {y.device} but x is on {x.device}")
        same = y.dim() == x.dim() and all(y.shape[i] == x.shape[i] for i in range(x.dim()) if i != cd)
        torch._check(same, lambda: (
            f"corr_accumulate: x {list(x.shape)} and y {list(y.shape)} must agree on every dim except "
            f"channel_dim {channel_dim}"))
        c_y = y.shape[cd]
    c_x = x.shape[cd]
    for name, acc, shape in (("count", count, ()), ("sum_x", sum_x, (c_x,)), ("sum_xx", sum_xx, (c_x,)),
                             ("sum_y", sum_y, (c_y,)), ("sum_yy", sum_yy, (c_y,)), ("sum_xy", sum_xy, (c_x, c_y))):
        torch._check(acc.dtype == torch.float64, lambda: (
            f"corr_accumulate: {name} must be a float64 accumulator, got {acc.dtype}"))
        torch._check(tuple(acc.shape) == shape, lambda: (
            f"corr_accumulate: {name} must have shape {list(shape)}, got {list(acc.shape)}"))
        torch._check(acc.device == x.device, lambda: (
            f"corr_accumulate: {name} is on {acc.device} but x is on {x.device}"))
        torch._check(acc.is_contiguous(), lambda: (
            f"corr_accumulate: {name} must be contiguous, got strides {acc.stride()}"))
    return None


def lap_solve(
    cost: torch.Tensor, v: torch.Tensor | None = None, col4row: torch.Tensor | None = None, maximize: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of a square float64 CPU cost: (col4row int64 [n], column duals v
    float64 [n], number of augmenting paths). Passing a previous (v, col4row) warm-starts the solve:
    rows whose old column is still tight keep it and only the others are augmented (same optimum).
    `maximize`: the maximum-value assignment, solved as the minimum of -cost read in place (bit for bit
    the result of passing `-cost`; the duals are those of -cost).
    CPU only (no CUDA kernel: see csrc/ops.cpp); the one LAP wrapper every solver choice calls."""
    if use_native("lap_solve", cost.device):
        return torch.ops.pyrebasin.lap_solve(cost, v, col4row, maximize)
    return reference.lap_solve(cost, v, col4row, maximize)


@_register_fake("lap_solve")
def _lap_solve_fake(cost, v, col4row, maximize=False):
    torch._check(cost.dtype == torch.float64, lambda: f"lap_solve: cost must be float64, got {cost.dtype}")
    torch._check(cost.dim() == 2 and cost.shape[0] == cost.shape[1], lambda: (
        f"lap_solve: cost must be a square [n, n] matrix, got {list(cost.shape)}"))
    torch._check((v is None) == (col4row is None), lambda: (
        "lap_solve: pass both v and col4row for a warm start, or neither"))
    n = cost.shape[0]
    if v is not None:
        torch._check(v.dtype == torch.float64 and tuple(v.shape) == (n,), lambda: (
            f"lap_solve: v must be a float64 CPU tensor of shape [{n}], got {v.dtype} {list(v.shape)}"))
        torch._check(col4row.dtype == torch.long and tuple(col4row.shape) == (n,), lambda: (
            f"lap_solve: col4row must be an int64 CPU tensor of shape [{n}], got {col4row.dtype} "
            f"{list(col4row.shape)}"))
    return (cost.new_empty(n, dtype=torch.long), cost.new_empty(n), cost.new_empty((), dtype=torch.long))
