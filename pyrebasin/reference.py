"""Pure-PyTorch twins of every native op: the oracle that tests and benchmarks compare against.

Each function has the same signature and semantics as its `pyrebasin.ops` counterpart.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import rng

__all__ = ["permute_multi", "corr_accumulate", "lap_solve", "combine_batched"]


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


def _augmenting_row_reduction(cost, u, v, c4r, r4c):
    """JV's augmenting row reduction, as the native kernel runs it (two passes, 8 steps per free row):
    a free row takes its cheapest column at the price of its second cheapest, evicting its holder."""
    n = cost.shape[0]
    free = [i for i in range(n) if c4r[i] == -1]
    for _ in range(2):
        if not free:
            break
        current, kept, steps, limit = 0, 0, 0, len(free) * 8
        while current < len(free):
            i = free[current]
            current += 1
            steps += 1
            r = cost[i] - v
            j1 = int(torch.argmin(r))
            u1 = float(r[j1])
            j2, u2 = -1, float("inf")
            if n > 1:
                rest = r.clone()
                rest[j1] = float("inf")
                j2 = int(torch.argmin(rest))
                u2 = float(rest[j2])
            i0 = r4c[j1]
            lowers = j2 >= 0 and u1 < u2
            if steps < limit:
                if lowers:
                    v[j1] -= u2 - u1
                elif i0 >= 0 and j2 >= 0:
                    j1 = j2
                    i0 = r4c[j1]
                if i0 >= 0:
                    c4r[i0] = -1
                    if lowers:
                        current -= 1
                        free[current] = i0
                    else:
                        free[kept] = i0
                        kept += 1
            elif i0 >= 0:
                c4r[i0] = -1
                free[kept] = i0
                kept += 1
            c4r[i], r4c[j1] = j1, i
            u[i] = cost[i, j1] - v[j1]
        del free[kept:]


def lap_solve(cost, v=None, col4row=None, maximize=False):
    """The same shortest-augmenting-path solver (scipy's algorithm, warm start included), with the
    inner Dijkstra scan vectorised in torch: slow, but step for step what the native kernel does.
    `maximize`: solves -cost (the native kernel reads the entries negated, the same numbers)."""
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1] or cost.dtype != torch.float64:
        raise ValueError(f"lap_solve: cost must be a square float64 matrix, got {cost.dtype} {list(cost.shape)}")
    if (v is None) != (col4row is None):
        raise ValueError("lap_solve: pass both v and col4row for a warm start, or neither")
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("lap_solve: cost has NaN or infinite entries")
    if maximize:
        cost = -cost
    n = cost.shape[0]
    inf = float("inf")
    v = torch.zeros(n, dtype=torch.float64) if v is None else v.clone()
    u = torch.zeros(n, dtype=torch.float64)
    c4r = [-1] * n
    r4c = [-1] * n
    if col4row is not None:
        reduced = cost - v
        u = reduced.min(1).values
        for i, j in enumerate(col4row.tolist()):
            best = float(u[i])
            if j >= 0 and r4c[j] == -1 and float(reduced[i, j]) <= best + 1e-13 * (abs(best) + 1.0):
                u[i] = reduced[i, j]
                c4r[i], r4c[j] = j, i
    _augmenting_row_reduction(cost, u, v, c4r, r4c)
    augmentations = 0
    for cur in range(n):
        if c4r[cur] != -1:
            continue
        spc = torch.full((n,), inf, dtype=torch.float64)
        path = torch.full((n,), -1, dtype=torch.long)
        SR, SC = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        free_col = torch.tensor([r == -1 for r in r4c])
        i, mv, sink = cur, 0.0, -1
        while sink == -1:
            SR[i] = True
            r = mv + cost[i] - u[i] - v
            better = (r < spc) & ~SC
            path[better] = i
            spc = torch.where(better, r, spc)
            cand = torch.where(SC, torch.full_like(spc, inf), spc)
            lowest = float(cand.min())
            if lowest == inf:
                raise ValueError("lap_solve: the assignment problem is infeasible")
            ties = (cand == lowest).nonzero().flatten()
            free_ties = ties[free_col[ties]]
            j = int(free_ties[0] if len(free_ties) else ties[0])
            mv = lowest
            SC[j] = True
            if r4c[j] == -1:
                sink = j
            else:
                i = r4c[j]
        augmentations += 1
        u[cur] += mv
        for i2 in SR.nonzero().flatten().tolist():
            if i2 != cur:
                u[i2] += mv - spc[c4r[i2]]
        v[SC] -= mv - spc[SC]
        j = sink
        while True:
            i2 = int(path[j])
            r4c[j] = i2
            c4r[i2], j = j, c4r[i2]
            if i2 == cur:
                break
    return torch.tensor(c4r, dtype=torch.long), v, torch.tensor(augmentations)
