"""Perturbations of a found matching, for the robustness study of mode combinability: compose each perm
with a random permutation of a fraction q of its units, or re-solve each LAP on noisy costs.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..spec import PermutationSpec, apply_permutation
from .lap import solve_lap

__all__ = ["perturb_permutation", "hamming_fraction", "noisy_matching"]

Perms = dict[str, torch.Tensor]


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def perturb_permutation(perms: Mapping[str, torch.Tensor], q: float, seed: int | torch.Generator = 0) -> Perms:
    """Each perm composed with a random permutation of round(q·n) of its units (chosen uniformly; the
    others keep their match): `new = perm[σ]`. q=0 returns copies, q=1 a uniformly random matching."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"perturb_permutation: q={q} must lie in [0, 1]")
    g = _generator(seed)
    out = {}
    for name, p in perms.items():
        n = p.numel()
        m = int(round(q * n))
        sigma = torch.arange(n)
        if m >= 2:
            chosen = torch.randperm(n, generator=g)[:m]
            sigma[chosen] = chosen[torch.randperm(m, generator=g)]
        out[name] = p.long()[sigma].clone()
    return out


def hamming_fraction(perms: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """Fraction of all units (over every group) whose match differs from `reference`."""
    if set(perms) != set(reference):
        raise ValueError(f"perm groups differ: {sorted(set(perms) ^ set(reference))}")
    diff = sum(int((perms[k].long() != reference[k].long()).sum()) for k in perms)
    total = sum(p.numel() for p in perms.values())
    return diff / max(total, 1)


def noisy_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                   perms: Mapping[str, torch.Tensor], noise: float, seed: int | torch.Generator = 0) -> Perms:
    """Re-solve every group's weight-matching LAP around `perms` with Gaussian noise on its costs.

    With B aligned by `perms`, group p's cost is Σ over its (param, axis) of A_units · B_unitsᵀ (as in
    weight matching); `noise` is in units of that matrix's standard deviation. Returns `perms[p][σ_p]`
    for the LAP solutions σ_p (all groups solved against the same aligned B). noise=0 gives back a
    matching at least as good as `perms` for each group.
    """
    if noise < 0:
        raise ValueError(f"noisy_matching: noise={noise} must be >= 0")
    g = _generator(seed)
    aligned = apply_permutation(spec, perms, state_b)
    out = {}
    for name, pairs in spec.perm_to_axes.items():
        cost = None
        for key, axis in pairs:
            ua = spec.unit_matrix(state_a[key].double(), key, axis, name)
            ub = spec.unit_matrix(aligned[key].double(), key, axis, name)
            c = ua @ ub.T
            cost = c if cost is None else cost + c
        cost = cost.cpu()
        if noise > 0:
            cost = cost + noise * cost.std() * torch.randn(cost.shape, generator=g, dtype=torch.float64)
        sigma = solve_lap(cost)
        out[name] = perms[name].long().cpu()[sigma].to(perms[name].device)
    return out
