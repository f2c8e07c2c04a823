"""Activation matching for specs with nested perms: each family (an outer perm and the perms nested
under it) is solved as one unit from the correlations of its members' sites (`nested.solve_family`).

A site's correlation is over the joint index of its permuted factors (entry order: an outer factor
before its children). A member's cost from one site: B's columns gathered with the member's unit (and,
for a child, its outer) unmoved, siblings under the same outer at their current arrangement of each
source block and the other factors at their current perms; then the factors outside the unit are
contracted along that alignment (summed on the diagonal), or, while their perm is still unsolved,
reduced by their best per-pair match (max over B, sum over A) as in the plain descent. The outer perm's
own cost comes from the sites where no child rides on its factor. A family's first solve is always
taken (its costs were provisional); later solves are kept only when the summed correlation rises, else
each child is re-solved within the current block map and kept only when it rises.
"""
from __future__ import annotations

import math

import torch

from ..nested import gather_slots, tensor_slots
from ..spec import Blocked
from .lap import solve_lap
from .nested import solve_family, solve_within_blocks, source_ordered

__all__ = ["family_descent"]


def _layout(site, n: int, nested):
    """(factor sizes, pseudo entry, slots) of a site's joint correlation index."""
    if isinstance(site.entry, str):
        fs = (n,)
    else:
        fs = tuple(s for s, p in zip(site.entry.shape, site.entry.perms) if p is not None)
    entry = Blocked(fs, site.perms)
    return fs, entry, tensor_slots(site.module, (entry,), (n,), nested)


def _member_cost(c, layout, member: str, i: int, perms, sizes, solved) -> torch.Tensor:
    """Member's cost from one site's correlation `c`, for its slot `i` (module docstring)."""
    fs, entry, slots = layout
    s = slots[i]
    mod = dict(perms)
    mod[member] = torch.arange(sizes[member])
    unit = [i]
    if s.outer is not None:
        q = slots[s.outer].perm
        unit = [s.outer, i]
        for t in slots:
            if t.outer == s.outer and t.perm != member:
                mod[t.perm] = source_ordered(perms[t.perm], perms[q])
        mod[q] = torch.arange(sizes[q])
    n = c.shape[0]
    idx = gather_slots(torch.arange(n), (entry,), slots, mod)
    cg = c.index_select(1, idx)
    rest = [j for j in range(len(slots)) if j not in unit]
    fixed = [j for j in rest if slots[j].perm in solved]
    loose = [j for j in rest if slots[j].perm not in solved]
    order = unit + fixed + loose
    k = len(fs)
    x = cg.reshape(fs + fs).permute(order + [k + j for j in order])
    nu = sizes[member]
    nf, nl = math.prod(fs[j] for j in fixed), math.prod(fs[j] for j in loose)
    x = x.reshape(nu, nf, nl, nu, nf, nl).diagonal(dim1=1, dim2=4).sum(-1)   # [nu, nl, nu, nl]
    return x.amax(3).sum(1)


def family_descent(corr, sizes, coupled, perms, alone, max_iter, solver, spec, tie: float):
    """Solve the coupled perms of a nested spec family by family, in place in `perms`; returns (the
    objective history with the perms solved alone added, the sweeps run)."""
    nested = spec.nested
    layouts = {s: _layout(s, c.shape[0], nested) for s, c in corr.items()}

    def objective(ps) -> float:
        total = alone["after"]
        for s, c in corr.items():
            fs, entry, slots = layouts[s]
            idx = gather_slots(torch.arange(c.shape[0]), (entry,), slots, ps)
            total += float(c[torch.arange(c.shape[0]), idx].sum())
        return total

    def cost(member, ps, solved, own=False):
        total = None
        for s, c in corr.items():
            slots = layouts[s][2]
            for i, t in enumerate(slots):
                if t.perm == member and not (own and any(u.outer == i for u in slots)):
                    x = _member_cost(c, layouts[s], member, i, ps, sizes, solved)
                    total = x if total is None else total.add_(x)
        if total is not None:
            total.diagonal().add_(tie)   # ties go to the identity (as activation_matching's)
        return total

    kids_of: dict[str, list[str]] = {}
    for p, q in nested.items():
        kids_of.setdefault(q, []).append(p)
    fams = sorted({nested.get(p, p) for p in coupled}, key=lambda q: (sizes[q], q))
    fams = [(q, sorted(kids_of.get(q, []))) for q in fams]
    history = [objective({p: torch.arange(n) for p, n in sizes.items()} | {p: v for p, v in perms.items()
                                                                           if p not in coupled})
               - alone["after"] + alone["before"]]
    solved: set[str] = set()
    sweeps = 0
    for _ in range(max(1, max_iter)):
        sweeps += 1
        changed = False
        for q, kids in fams:
            first = q not in solved
            before = objective(perms)
            own = cost(q, perms, solved, own=bool(kids))
            if kids:
                kc = {c: v for c in kids if (v := cost(c, perms, solved)) is not None}
                sol = solve_family(own, kc, sizes[q], solver=solver)
                cand = {q: sol.outer} | sol.children
            else:
                cand = {q: solve_lap(own, solver=solver)}
            solved.update([q, *kids])
            trial = perms | cand
            same = all(torch.equal(trial[p], perms[p]) for p in cand)
            if not same and (first or objective(trial) > before + 1e-12 * max(1.0, abs(before))):
                perms.update(cand)
                changed = True
                continue
            for c in kids if not first else []:
                x = cost(c, perms, solved)
                if x is None:
                    continue
                new = solve_within_blocks(x, perms[q], solver=solver)
                value = objective(perms | {c: new})
                if not torch.equal(new, perms[c]) and value > before + 1e-12 * max(1.0, abs(before)):
                    perms[c], before, changed = new, value, True
        history.append(objective(perms))
        if not changed:
            break
    return history, sweeps
