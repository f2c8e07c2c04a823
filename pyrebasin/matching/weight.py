"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): coordinate descent over permutation groups,
each step one LAP on Σ W_A·W̃_Bᵀ over the group's (param, axis) pairs, B's other permutations applied.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import ops
from ..spec import Blocked, PermutationSpec, apply_permutation, axis_index, check_permutations
from .lap import default_solver, solve_lap

__all__ = ["MatchResult", "weight_matching"]


@dataclass
class MatchResult:
    """Permutations to apply to model B (`apply_permutation(spec, result.perms, state_b)` aligns B
    to A), the objective after each sweep (initial value first) and the number of sweeps run."""

    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)
    iterations: int = 0


@dataclass
class _Term:
    """One (param, axis) of a perm group: A's unit matrix and B viewed with the group's units first."""

    param: str
    a_units: torch.Tensor                      # [n, rest] view (or copy) of A
    b_view: torch.Tensor                       # B reshaped/moved so dim 0 holds the units (a view)
    dims: list                                 # per b_view dim > 0: ("flat", entry) | ("perm", name) | None
    deps: frozenset                            # perms that the gather of B reads


def _expanded_view(t: torch.Tensor, entries, axis: int, factor: int):
    """`t` with `axis` split into its Blocked factors and the unit factor moved first, plus what
    permutes each remaining dim of that view."""
    shape, dims = [], []
    for a, entry in enumerate(entries):
        if a == axis and isinstance(entry, Blocked):
            for f, (s, p) in enumerate(zip(entry.shape, entry.perms)):
                shape.append(s)
                dims.append("unit" if f == factor else (("perm", p) if p is not None else None))
        else:
            shape.append(t.shape[a])
            dims.append("unit" if a == axis else (("flat", entry) if entry is not None else None))
    unit = dims.index("unit")
    view = t.reshape(shape).movedim(unit, 0)
    return view, dims[:unit] + dims[unit + 1:]


def _compute_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare(spec: PermutationSpec, state_a, state_b):
    sizes = spec.perm_sizes(state_a)
    sizes_b = spec.perm_sizes(state_b)
    for key in spec.axes_to_perm:
        if state_a[key].shape != state_b[key].shape:
            raise ValueError(f"weight_matching: {key!r} has shape {list(state_a[key].shape)} in A "
                             f"but {list(state_b[key].shape)} in B")
    assert sizes == sizes_b
    permuted = [k for k in spec.axes_to_perm if k not in set(spec.fixed)]
    for k in permuted:
        for name, t in (("A", state_a[k]), ("B", state_b[k])):
            if not t.is_floating_point():
                raise TypeError(f"weight_matching: {name}[{k!r}] is {t.dtype}; permuted tensors must be floating")
    dtype = _compute_dtype([state_a[k] for k in permuted])
    # bf16/fp16 weights are matched in float32 (converted once); float32/64 are used as they are.
    a = {k: state_a[k].detach().to(dtype) for k in permuted}
    b = {k: state_b[k].detach().to(device=a[k].device, dtype=dtype) for k in permuted}
    terms: dict[str, list[_Term]] = {p: [] for p in sizes}
    for perm, pairs in spec.perm_to_axes.items():
        for key, axis in pairs:
            entries = spec.axes_to_perm[key]
            factor = spec.factor(key, axis, perm)
            a_units = spec.unit_matrix(a[key], key, axis, perm)
            view, dims = _expanded_view(b[key], entries, axis, factor)
            deps = set()
            for d in dims:
                if d is None:
                    continue
                if d[0] == "perm":
                    deps.add(d[1])
                else:
                    deps.update(p for p in ([d[1]] if isinstance(d[1], str) else d[1].perms) if p is not None)
            terms[perm].append(_Term(key, a_units, view, dims, frozenset(deps)))
    return sizes, a, b, terms, dtype


class _CostBuilder:
    """Builds each group's cost matrix: the terms that no other perm touches are summed once; the
    others gather B along its other permuted axes in one fused `permute_multi` call, then one GEMM each."""

    def __init__(self, terms, sizes, device_perms, dtype):
        self.terms, self.sizes, self.perms, self.dtype = terms, sizes, device_perms, dtype
        self.constant: dict[str, torch.Tensor | None] = {}
        for p, ts in terms.items():
            fixed = [t for t in ts if not t.deps]
            c = None
            for t in fixed:
                prod = t.a_units @ t.b_view.reshape(t.b_view.shape[0], -1).T
                c = prod if c is None else c.add_(prod)
            self.constant[p] = c

    def deps(self, p: str) -> frozenset:
        return frozenset().union(*(t.deps for t in self.terms[p]))

    def cost(self, p: str) -> torch.Tensor:
        n = self.sizes[p]
        var = [t for t in self.terms[p] if t.deps]
        base = self.constant[p]
        if not var:
            return base if base is not None else torch.zeros(n, n, dtype=self.dtype)
        tensors, indices, owners, axes = [], [], [], []
        for j, t in enumerate(var):
            tensors.append(t.b_view)
            for d, spec_dim in enumerate(t.dims, start=1):
                if spec_dim is None:
                    continue
                kind, what = spec_dim
                dev = t.b_view.device
                if kind == "perm":
                    idx = self.perms[what].to(dev)
                else:
                    idx = axis_index(what, self.perms, t.b_view.shape[d], dev)
                if idx is not None:
                    indices.append(idx)
                    owners.append(j)
                    axes.append(d)
        gathered = ops.permute_multi(tensors, indices, owners, axes)
        c = base.clone() if base is not None else None
        for t, g in zip(var, gathered):
            g2 = g.reshape(n, -1)
            c = t.a_units @ g2.T if c is None else c.addmm_(t.a_units, g2.T)
        return c


def _objective(a, b, spec: PermutationSpec, perms) -> float:
    """Σ over permuted tensors of <W_A, π(W_B)>, in float64."""
    pb = apply_permutation(spec.restrict(a), perms, b)
    return sum(float(torch.dot(a[k].reshape(-1).double(), pb[k].reshape(-1).double())) for k in a)


@torch.no_grad()
def weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor],
                    state_b: Mapping[str, torch.Tensor], *, max_iter: int = 100, seed: int = 0,
                    init: Mapping[str, torch.Tensor] | None = None, solver: str | None = None,
                    progress: bool = False, tol: float = 1e-12, warm_start: bool = True) -> MatchResult:
    """Permutations of B's units that maximise Σ <W_A, π(W_B)> (Git Re-Basin weight matching).

    Each sweep visits the perm groups in a seeded random order and solves one LAP per group (cost on
    the tensors' device, LAP on the CPU, `solver` as in `solve_lap`; with the default "jv" solver and
    `warm_start`, each group's LAP restarts from its previous duals); a group whose dependencies did
    not change since its last solve is skipped (its LAP would return the same answer). Stops after a
    sweep without an improvement > `tol` or after `max_iter` sweeps. Inputs are never modified.
    """
    if max_iter < 0:
        raise ValueError(f"weight_matching: max_iter={max_iter} must be >= 0")
    sizes, a, b, terms, dtype = _prepare(spec, state_a, state_b)
    if init is None:
        perms = {p: torch.arange(n) for p, n in sizes.items()}
    else:
        check_permutations(spec, init, sizes)
        perms = {p: init[p].detach().to("cpu", torch.long).clone() for p in sizes}
    device = next(iter(a.values())).device if a else torch.device("cpu")
    device_perms = {p: v.to(device) for p, v in perms.items()}
    builder = _CostBuilder(terms, sizes, device_perms, dtype)
    deps = {p: sorted(builder.deps(p)) for p in sizes}
    version = dict.fromkeys(sizes, 0)
    solved_at: dict[str, tuple | None] = dict.fromkeys(sizes, None)
    names = list(sizes)
    solver = solver or default_solver()
    lap_states: dict = dict.fromkeys(sizes)
    gen = torch.Generator().manual_seed(seed)
    history = [_objective(a, b, spec, device_perms)]
    sweeps = 0
    bar = tqdm(range(max_iter), desc="weight matching", disable=not progress, leave=False)
    for _ in bar:
        sweeps += 1
        improved = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            p = names[i]
            snapshot = tuple(version[d] for d in deps[p])
            if solved_at[p] == snapshot:
                continue  # nothing it reads changed: the LAP would return the same optimum
            solved_at[p] = snapshot
            cost = builder.cost(p).to("cpu", torch.float64)
            new, lap_states[p] = solve_lap(cost, solver=solver, return_state=True,
                                           warm_start=lap_states[p] if warm_start else None)
            rows = torch.arange(sizes[p])
            gain = float(cost[rows, new].sum() - cost[rows, perms[p]].sum())
            if gain > tol:
                perms[p] = new
                device_perms[p] = new.to(device)
                version[p] += 1
                improved = True
        history.append(_objective(a, b, spec, device_perms))
        bar.set_postfix(objective=f"{history[-1]:.6g}")
        if not improved:
            break
    return MatchResult(perms=perms, objective=history, iterations=sweeps)
