"""Weight matching for specs with nested perms (`PermutationSpec.nested`): coordinate descent over
*families* (an outer perm Q and every perm nested under it; a perm with no nesting is a family of one),
each visit one exact joint solve of the family (`nested.solve_family`), checked on the true objective.

A member's cost is Σ over its terms of A's unit matrix times B's, with everything outside the family at
its current value and B's blocks unmoved (its outer perm read as the identity); a sibling nested under
the same outer slot of a tensor (GQA o_proj: query heads and value dims under the KV heads) is read at
its current inner arrangement of each *source* block (`nested.source_ordered`). The outer perm's own
cost holds only the terms where no child rides on its slot; the others are counted in the children.
When no two children share a tensor the family objective is linear in each member and the joint solve
is its exact optimum; when they do (o_proj), the joint solve's value counts the shared tensor in each
child, so it can overshoot: a candidate is kept only when the true objective over the family's tensors
rises, else the children are updated one at a time within the block map (exact coordinate steps, each
kept only when the objective rises). The true objective never decreases, sweep after sweep.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from ..distributed import is_distributed
from ..spec import PermutationSpec, check_permutations
from .lap import solve_lap
from .nested import solve_family, solve_within_blocks
from .nested_costs import NestedCosts, is_lazy
from .perturb import perturb_permutation

__all__ = ["NestedCosts", "Problem", "descend", "refine_families", "nested_descent", "families", "is_lazy"]

KICK = 0.1  # share of a family's blocks that a refinement visit shuffles (as weight.KICK)
REFINE_BUDGET = 0.5  # refinement stops after this share of the schedule's family visits (as weight.REFINE_BUDGET)
REFINE_WORK = 0.5  # ... and after this share of the work done before it (NestedCosts.work)


def families(spec: PermutationSpec, names) -> list[tuple[str, list[str]]]:
    """(outer perm, its children) for every perm that is not nested, in spec order."""
    kids: dict[str, list[str]] = {}
    for p, q in spec.nested.items():
        kids.setdefault(q, []).append(p)
    return [(q, sorted(kids.get(q, []), key=list(names).index)) for q in names if q not in spec.nested]


def _value(cost: torch.Tensor | None, perm: torch.Tensor) -> float:
    return 0.0 if cost is None else float(cost[torch.arange(perm.numel()), perm].sum())


def _step(costs: NestedCosts, perms: dict, outer: str, kids: list[str], keys: list[str], tol: float,
          solver, stats: dict, coupling: float = 1.0, linear: bool = False) -> bool:
    """One visit of a family: the joint solve, kept when the objective over `keys` rises, else each
    child alone within the current block map. Updates `perms` in place; whether anything changed.
    `linear` (each tensor holds at most one term of the family): the costs give the objective's
    change exactly, so no objective is evaluated."""
    own = costs.cost(outer, perms, own=bool(kids), coupling=coupling)
    kid_costs = {c: costs.cost(c, perms, coupling=coupling) for c in kids}
    n = costs.sizes[outer]
    if kids:
        sol = solve_family(own, {c: v for c, v in kid_costs.items() if v is not None}, n, solver=solver)
        stats["inner_solves"] += sol.inner_solves
        stats["inner_possible"] += sol.inner_possible
        cand = {outer: sol.outer} | {c: sol.children.get(c, perms[c]) for c in kids}
        if any(c not in sol.children for c in kids):   # a child without terms keeps its inner perms
            for c in kids:
                if c not in sol.children:
                    inner = perms[c].view(n, -1) % (perms[c].numel() // n)
                    cand[c] = (sol.outer.view(-1, 1) * inner.shape[1] + inner).reshape(-1)
    else:
        cand = {outer: solve_lap(own, solver=solver) if own is not None else perms[outer]}
    if all(torch.equal(cand[p], perms[p]) for p in cand):
        return False
    if linear:   # the objective's change is the costs' change (the joint solve is its exact optimum)
        old = _value(own, perms[outer]) + sum(_value(kid_costs[c], perms[c]) for c in kids)
        new = _value(own, cand[outer]) + sum(_value(kid_costs[c], cand[c]) for c in kids)
        if new > old + tol * max(1.0, abs(old)):
            perms.update(cand)
            return True
        return False
    before = costs.objective(perms, keys, coupling)
    gain = lambda value: value > before + tol * max(1.0, abs(before))  # noqa: E731
    trial = perms | cand
    if gain(costs.objective(trial, keys, coupling)):
        perms.update(cand)
        return True
    if not kids:
        return False
    stats["fallbacks"] += 1
    changed = False
    for c in kids:   # one child at a time, the block map held: exact coordinate steps
        cost = costs.cost(c, perms, coupling=coupling)
        if cost is None:
            continue
        new = solve_within_blocks(cost, perms[outer], solver=solver)
        if torch.equal(new, perms[c]):
            continue
        trial = perms | {c: new}
        value = costs.objective(trial, keys, coupling)
        if gain(value):
            perms[c], before, changed = new, value, True
    return changed


class Problem:
    """What one descent needs: the costs, the families, the tensors and perms each family reads."""

    def __init__(self, costs: NestedCosts, spec: PermutationSpec, solver, tol: float):
        self.costs, self.solver, self.tol = costs, solver, tol
        self.fams = families(spec, list(costs.sizes))
        self.keys_of = {q: list(dict.fromkeys(k for p in [q, *kids] for k in costs.keys_of.get(p, [])))
                        for q, kids in self.fams}
        self.deps = {q: sorted({s.perm for k in self.keys_of[q] for s in costs.slots[k]}) for q, _ in self.fams}
        self.linear = {}
        for q, kids in self.fams:   # at most one of the family's terms per tensor: its objective is linear
            terms = [k for p in [q, *kids] for k, _ in costs.terms(p, own=p == q and bool(kids))]
            self.linear[q] = len(terms) == len(set(terms))
        self.stats = {"inner_solves": 0, "inner_possible": 0, "fallbacks": 0, "visits": 0}


def descend(prob: Problem, perms: dict, gen: torch.Generator, coupling: float, max_iter: int, bar, *,
             only=None, track: tuple | None = None) -> int:
    """Sweeps over the families (`only`: those outer perms) in a random order until one changes
    nothing (or `max_iter`); each family is revisited only when a perm its costs read changed.
    `track`: (perm versions, family -> versions of its last visit without a gain), carried between
    calls (a family already at its optimum for the current perms can be marked so). Returns the sweeps run."""
    version, seen = track if track is not None else (dict.fromkeys(perms, 0), {})
    fams = [f for f in prob.fams if only is None or f[0] in only]
    for sweep in range(1, max_iter + 1):
        improved = False
        for i in torch.randperm(len(fams), generator=gen).tolist():
            q, kids = fams[i]
            snap = tuple(version[d] for d in prob.deps[q])
            if seen.get(q) == snap:
                continue   # nothing the family's costs read changed since its last visit
            old = {p: perms[p] for p in [q, *kids]}
            prob.stats["visits"] += 1
            with prob.costs.visiting(prob.keys_of[q]):
                gained = _step(prob.costs, perms, q, kids, prob.keys_of[q], prob.tol, prob.solver, prob.stats,
                               coupling, prob.linear[q])
            if gained:
                improved = True   # revisited next sweep: its own change moves its members' costs
                for p in old:
                    if not torch.equal(old[p], perms[p]):
                        version[p] += 1
                seen.pop(q, None)
            else:
                seen[q] = snap
        if bar is not None:
            bar.update()
        if not improved:
            return sweep
    if max_iter:
        warnings.warn(f"weight_matching: a descent stopped at max_iter={max_iter} sweeps while still improving "
                      f"(coupling {coupling}); raise max_iter", RuntimeWarning, stacklevel=5)
    return max_iter


def _kick(perms: dict, q: str, kids: list[str], share: float, gen: torch.Generator) -> dict:
    """The family's blocks shuffled: a share of Q's target positions exchanged, each child's blocks
    moving with them (its inner perms kept), so every nested perm still follows Q."""
    new_q = perturb_permutation({q: perms[q]}, share, seed=gen)[q]
    sigma = torch.argsort(perms[q])[new_q]   # new_q = old_q[sigma]
    out = {q: new_q}
    for c in kids:
        out[c] = perms[c].view(new_q.numel(), -1).index_select(0, sigma).reshape(-1)
    return out


def refine_families(prob: Problem, perms: dict, history: list, gen: torch.Generator, passes: int, max_iter: int,
                    track: tuple | None = None) -> tuple[dict, int]:
    """Iterated local search: each visit shuffles a share `KICK` of one family's blocks, re-descends
    and keeps the result only when the objective rose (appended to `history`), within `REFINE_BUDGET`
    x the family visits made before it and `REFINE_WORK` x the work done before it (`NestedCosts.work`:
    multiply-adds and elements read; machine-independent, the same in memory and streamed), so a kick
    whose re-descent costs a pass over the model is counted as such.
    With `track` (as `descend`'s, for `perms`), a trial revisits only the families that the kick
    reaches. Returns (perms, sweeps run)."""
    budget, start, sweeps = REFINE_BUDGET * prob.stats["visits"], prob.stats["visits"], 0
    work_budget, work0 = REFINE_WORK * prob.costs.work, prob.costs.work
    for _ in range(passes):
        for i in torch.randperm(len(prob.fams), generator=gen).tolist():
            if prob.stats["visits"] - start >= budget or prob.costs.work - work0 >= work_budget:
                break
            q, kids = prob.fams[i]
            trial = perms | _kick(perms, q, kids, KICK, gen)
            t = track and ({p: v + (p in (q, *kids)) for p, v in track[0].items()}, dict(track[1]))
            sweeps += descend(prob, trial, gen, 1.0, max_iter, None, track=t)
            value = prob.costs.objective(trial)
            if value > history[-1] + prob.tol * max(1.0, abs(history[-1])):
                perms = trial
                history.append(value)
                if track is not None:
                    track[0].update(t[0]), track[1].clear(), track[1].update(t[1])
    return perms, sweeps


_Problem = Problem   # the name earlier callers used


def nested_descent(spec: PermutationSpec, state_a, state_b, *, schedule=(1.0,), restarts: int = 1, refine: int = 0,
                   max_iter: int = 100, seed: int = 0, init: Mapping[str, torch.Tensor] | None = None,
                   solver: str | None = None, progress: bool = False, tol: float = 1e-12, group=None):
    """Weight matching's coordinate descent on a spec with nested perms (module docstring): one descent
    per coupling weight of `schedule` (coupled tensors weighted by it; the last, 1.0, is the true
    objective), then `refine` passes of iterated local search (each family visit shuffles a share
    `KICK` of its blocks, re-descends and keeps the result only when the objective rose, within
    `REFINE_BUDGET` x the schedule's family visits). With `restarts`, family-order seeds seed,
    seed+1, ... and the best final objective kept. Returns (perms, objective history, sweeps, seed, stats)."""
    if is_distributed(group):
        raise ValueError("weight_matching: specs with nested perms are matched in one process; pass group=False")
    # the cost cache: as WeightCosts' in memory, as StreamedCosts' (512 MiB) for lazy checkpoints
    costs = NestedCosts(spec, state_a, state_b, cache_bytes=(512 << 20) if is_lazy(state_a) else (1 << 30))
    if init is not None:
        check_permutations(spec, init, costs.sizes)
    best = None
    bar = tqdm(total=max_iter * len(schedule) * restarts, desc="weight matching (nested)", disable=not progress,
               leave=False)
    for s in range(seed, seed + restarts):
        prob = Problem(costs, spec, solver, tol)
        perms = {p: (torch.arange(n) if init is None else init[p].detach().to("cpu", torch.long).clone())
                 for p, n in costs.sizes.items()}
        gen = torch.Generator().manual_seed(s)
        history, sweeps = [costs.objective(perms)], 0
        for coupling in schedule:
            sweeps += descend(prob, perms, gen, coupling, max_iter, bar)
            history.append(costs.objective(perms))
        perms, more = refine_families(prob, perms, history, gen, refine, max_iter)
        sweeps += more
        bar.set_postfix(objective=f"{history[-1]:.6g}")
        if best is None or history[-1] > best[1][-1]:
            best = (perms, history, sweeps, s, prob.stats)
    bar.close()
    return best
