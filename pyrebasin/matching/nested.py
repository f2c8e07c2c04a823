"""Matching a family of nested permutations: an outer perm Q and the perms nested under it (each moves
blocks of m units following Q, and permutes freely inside each block: the wreath product S_m ≀ S_|Q|).

`solve_family` maximises, over Q and every child's inner perms at once,
    Σ_k' own[k', Q[k']] + Σ_children Σ_k',g' C[k'm + g', Q[k']m + σ_k'(g')],
the objective of a family whose member costs are linear (each member's cost built with everything else
fixed). Pairing A-block k' with B-block k is worth own[k', k] plus, for each child, the optimum of the
m×m LAP on that block pair; one outer LAP on these values, then each child takes the inner optima of
the chosen pairs. The result is the exact optimum of that objective.

The |Q|² inner LAPs are solved lazily: every pair starts at a cheap upper bound of its inner optimum
(min of Σ row maxima and Σ column maxima, for all pairs in one vectorised pass), the outer LAP is solved
on the current values, the inner LAPs of its chosen pairs still at a bound are solved exactly, and the
outer LAP re-solved, until it picks only exactly-valued pairs. That assignment is optimal for the exact
values (every other assignment's exact value is at most its bounded value, which is at most the
chosen one's), so pruning never changes the result; it only skips inner LAPs of pairs that cannot win.
On related models the bounds of mismatched pairs fall below the matched pairs' values and about |Q|
inner LAPs are solved instead of |Q|²; the worst case solves all |Q|². Blocks of m <= `BRUTE_MAX` are
solved exactly for every pair by enumerating the m! inner perms in one batched gather.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .lap import solve_lap

__all__ = ["FamilySolution", "solve_family", "solve_within_blocks", "source_ordered", "assemble", "BRUTE_MAX"]

BRUTE_MAX = 5  # blocks of at most this many units: every m! inner perm evaluated at once (120 at m = 5)


@dataclass
class FamilySolution:
    """The outer perm, each child's nested perm, the optimum of the family's linear objective
    (`value`), and the work done: inner LAPs solved by the LAP solver (`inner_solves`, of
    `inner_possible` = |Q|² x the children with blocks > `BRUTE_MAX`) and outer LAPs (`outer_solves`)."""

    outer: torch.Tensor
    children: dict[str, torch.Tensor] = field(default_factory=dict)
    value: float = 0.0
    inner_solves: int = 0
    inner_possible: int = 0
    outer_solves: int = 0


def source_ordered(child: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """A nested perm's inner arrangement per *source* block, as a perm nested under the identity:
    S[k*m + j] = P[Q⁻¹[k]*m + j]. Gathering B with Q = identity and P = S arranges each of B's blocks as
    P does, without moving the blocks: what a member's cost reads of a sibling held fixed."""
    k = outer.numel()
    inv = torch.argsort(outer.to(child.device))
    return child.view(k, -1).index_select(0, inv).reshape(-1)


def assemble(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The nested perm with block map `outer` [K] and inner perms `inner` [K, m] (per target block)."""
    m = inner.shape[1]
    return (outer.long().view(-1, 1) * m + inner.long()).reshape(-1)


def _blocks(cost: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """A child's cost [K·m, K·m] as blocks [K (A), K (B), m, m]."""
    n = cost.shape[0]
    if cost.dim() != 2 or cost.shape[1] != n or n % k:
        raise ValueError(f"solve_family: child {name!r} has a cost of shape {list(cost.shape)}; expected a square "
                         f"matrix whose side is a multiple of the outer perm's {k} units")
    m = n // k
    return cost.view(k, m, k, m).permute(0, 2, 1, 3)


def _brute(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(optimum, inner perm) of every m×m block [..., m, m], by enumerating the m! perms (m small)."""
    m = blocks.shape[-1]
    cands = torch.tensor(list(itertools.permutations(range(m))), dtype=torch.long)   # [F, m]
    flat = blocks.reshape(-1, m, m)
    vals = flat[:, torch.arange(m).view(1, m), cands].sum(-1)                         # [N, F]
    best = vals.argmax(1)
    return vals.gather(1, best.view(-1, 1)).view(blocks.shape[:-2]), cands[best].view(blocks.shape[:-1])


def _lap_value(block: torch.Tensor, solver) -> tuple[float, torch.Tensor]:
    perm = solve_lap(block, solver=solver)
    return float(block[torch.arange(block.shape[0]), perm].sum()), perm


def _bound(cost: torch.Tensor, k: int) -> torch.Tensor:
    """An upper bound of every block pair's LAP optimum [K (A), K (B)]: min(Σ row maxima, Σ column
    maxima), from the contiguous cost (no block copy), plus a relative margin far above the rounding
    of either sum."""
    c = cost.view(k, cost.shape[0] // k, k, -1)
    row_max, col_max = c.amax(3), c.amax(1)                 # [K, m, K], [K, K, m]
    rows, cols = row_max.sum(1), col_max.sum(2)
    margin = 1e-9 * (row_max.abs().sum(1) + col_max.abs().sum(2) + 1e-300)
    return torch.minimum(rows, cols) + margin


def solve_family(own: torch.Tensor | None, children: Mapping[str, torch.Tensor], n_outer: int, *,
                 solver: str | None = None, brute_max: int = BRUTE_MAX) -> FamilySolution:
    """The outer perm and nested children maximising the family's linear objective (module docstring).

    `own`: the outer perm's own cost [|Q|, |Q|] (the terms no child shares; None: zero); `children[P]`:
    child P's cost [|P|, |P|] with B's unit index in source order (B's blocks unmoved), |P| = m·|Q|.
    Costs are read, never modified. Exact: the value is the optimum; ties may break either way."""
    k = int(n_outer)
    total = torch.zeros(k, k, dtype=torch.float64) if own is None else own.detach().to("cpu", torch.float64).clone()
    if total.shape != (k, k):
        raise ValueError(f"solve_family: the outer cost has shape {list(total.shape)}; expected [{k}, {k}]")
    fixed, lazy = {}, {}   # child -> inner perms of every pair [K, K, m] (exact) | (blocks, bound, exact, perms)
    for name, cost in children.items():
        cost = cost.detach().to("cpu", torch.float64)
        b = _blocks(cost, k, name)
        m = b.shape[-1]
        if m <= brute_max:
            vals, perms = _brute(b)
            total += vals
            fixed[name] = perms
        else:
            lazy[name] = (b, _bound(cost, k), torch.full((k, k), math.nan, dtype=torch.float64), {})
    out = FamilySolution(torch.arange(k), inner_possible=k * k * len(lazy))
    while True:
        values = total.clone()
        for b, ub, exact, _ in lazy.values():
            values += torch.where(exact.isnan(), ub, exact)
        outer = solve_lap(values, solver=solver)
        out.outer_solves += 1
        chosen = [(a, int(outer[a])) for a in range(k)]
        todo = [(a, c) for a, c in chosen for _, _, exact, _ in lazy.values() if math.isnan(float(exact[a, c]))]
        if not todo:
            break
        for a, c in dict.fromkeys(todo):
            for b, _, exact, perms in lazy.values():
                if math.isnan(float(exact[a, c])):
                    exact[a, c], perms[a, c] = _lap_value(b[a, c].contiguous(), solver)
                    out.inner_solves += 1
    rows = torch.arange(k)
    out.outer, out.value = outer, float(values[rows, outer].sum())
    for name, perms in fixed.items():
        out.children[name] = assemble(outer, perms[rows, outer])
    for name, (_, _, _, perms) in lazy.items():
        out.children[name] = assemble(outer, torch.stack([perms[a, int(outer[a])] for a in range(k)]))
    out.children = {name: out.children[name] for name in children}
    return out


def solve_within_blocks(cost: torch.Tensor, outer: torch.Tensor, *, solver: str | None = None,
                        brute_max: int = BRUTE_MAX) -> torch.Tensor:
    """Child's best nested perm with the block map `outer` held: target block k' takes the optimum of
    its m×m LAP against B's block outer[k'] (cost in source order, as for `solve_family`)."""
    k = outer.numel()
    b = _blocks(cost.detach().to("cpu", torch.float64), k, "child")
    rows, outer = torch.arange(k), outer.to("cpu").long()
    chosen = b[rows, outer]                                              # [K, m, m]
    if chosen.shape[-1] <= brute_max:
        return assemble(outer, _brute(chosen)[1])
    return assemble(outer, torch.stack([solve_lap(chosen[a], solver=solver) for a in range(k)]))
