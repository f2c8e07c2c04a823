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

import contextlib
import warnings
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from .._heap import release_heap
from ..distributed import is_distributed
from ..nested import gather_slots, tensor_slots
from ..spec import Blocked, PermutationSpec, check_permutations
from .costs import dot64
from .lap import solve_lap
from .nested import solve_family, solve_within_blocks, source_ordered
from .perturb import perturb_permutation

__all__ = ["NestedCosts", "Problem", "descend", "refine_families", "nested_descent", "families", "is_lazy"]

KICK = 0.1  # share of a family's blocks that a refinement visit shuffles (as weight.KICK)
REFINE_BUDGET = 0.5  # refinement stops after this share of the schedule's family visits (as weight.REFINE_BUDGET)
REFINE_WORK = 0.5  # on lazy checkpoints, also after this share of the work done before it (NestedCosts.work)
TOTAL_GROUPS = 4  # a member with at least this many cost groups keeps its total, updated by the groups that moved
VISIT_BYTES = 256 << 20  # a family visit reads its tensors once when they total at most this (per model, converted)


def families(spec: PermutationSpec, names) -> list[tuple[str, list[str]]]:
    """(outer perm, its children) for every perm that is not nested, in spec order."""
    kids: dict[str, list[str]] = {}
    for p, q in spec.nested.items():
        kids.setdefault(q, []).append(p)
    return [(q, sorted(kids.get(q, []), key=list(names).index)) for q in names if q not in spec.nested]


def is_lazy(state) -> bool:
    return hasattr(state, "read") and hasattr(state, "meta")


class NestedCosts:
    """The costs and objective of one nested weight-matching problem. In-memory states are held as
    float32 (float64 if any permuted tensor is) copies (`hold=False`: converted on use instead, no copy
    of a float32 model); lazy ones (`ShardedState`: `meta()`, `read(keys, dtype)`) are read tensor by
    tensor on use, so neither model is held. Within `visiting(keys)` those tensors are read once.
    Cost groups are cached in float64 within `cache_bytes`; each tensor's objective dot is remembered
    for the last two arrangements of the perms it reads (an objective re-reads only what moved)."""

    def __init__(self, spec: PermutationSpec, state_a, state_b, *, cache_bytes: int = 1 << 30, hold: bool = True):
        self.cache: dict[tuple, tuple] = {}   # (member, own, perms read) -> (their values, float64 cost sum)
        self.cache_left = cache_bytes
        metas = [s.meta() if is_lazy(s) else s for s in (state_a, state_b)]
        for name, meta in zip(("state_a", "state_b"), metas):
            missing = [k for k in spec.axes_to_perm if k not in meta]
            if missing:
                raise ValueError(f"weight_matching: {name} lacks {missing[:5]} (named in the spec)")
        self.sizes = spec.perm_sizes(metas[0])
        if spec.perm_sizes(metas[1]) != self.sizes:
            raise ValueError(f"weight_matching: perm sizes differ between A ({self.sizes}) and B "
                             f"({spec.perm_sizes(metas[1])})")
        for key in spec.axes_to_perm:
            if metas[0][key].shape != metas[1][key].shape:
                raise ValueError(f"weight_matching: {key!r} has shape {list(metas[0][key].shape)} in A "
                                 f"but {list(metas[1][key].shape)} in B")
        self.spec, self.keys = spec, [k for k in spec.axes_to_perm if k not in set(spec.fixed)]
        for k in self.keys:
            for name, t in (("A", metas[0][k]), ("B", metas[1][k])):
                if not t.is_floating_point():
                    raise TypeError(f"weight_matching: {name}[{k!r}] is {t.dtype}; permuted tensors must be floating")
        self.dtype = torch.float64 if any(metas[0][k].dtype == torch.float64 for k in self.keys) else torch.float32
        self.slots = {k: tensor_slots(k, spec.axes_to_perm[k], metas[0][k].shape, spec.nested) for k in self.keys}
        self.numel = {k: metas[0][k].numel() for k in self.keys}
        self.sources = (state_a, state_b)
        self.held = [None if is_lazy(s) or not hold else {k: s[k].detach().to(self.dtype) for k in self.keys}
                     for s in self.sources]
        self.visit: dict[str, tuple] = {}   # key -> (A, B) read once for the current family visit
        self.dots: dict[str, list] = {}     # key -> [(perms its gather read, <A_k, π(B_k)>)], the last two
        self.reads = 0                      # tensor pairs read (or converted) on use so far
        self.work = 0                       # multiply-adds of cost products and elements of objective dots so far
        # member totals (member, own) -> [coupling, {group: (its terms, perms read)}, float64 total]: a member
        # with at least TOTAL_GROUPS cost groups (a residual stream's perm, read by every layer) is rebuilt by
        # subtracting each moved group at its old perms and adding it at the new ones, within `totals_left`
        self.totals: dict[tuple, list] = {}
        self.totals_left = cache_bytes
        if self.held[0] is not None:
            self.held[1] = {k: v.to(self.held[0][k].device) for k, v in self.held[1].items()}
        self.keys_of = {p: list(dict.fromkeys(k for k, _ in pairs)) for p, pairs in spec.perm_to_axes.items()}
        # a tensor is *coupled* when a term of it reads a perm outside its unit: more than one plain slot,
        # or an outer slot with several children (the schedule's early phases weight these down)
        self.coupled = {k: not (len(ss) == 1 or (len(ss) == 2 and ss[1].outer == 0)) for k, ss in self.slots.items()}

    def pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A's and B's tensor `key` in the matching dtype (B on A's device)."""
        if key in self.visit:
            return self.visit[key]
        self.reads += self.held[0] is None
        a, b = (h[key] if h is not None else s.read([key], self.dtype)[key] if is_lazy(s) else
                s[key].detach().to(self.dtype) for h, s in zip(self.held, self.sources))
        return a, b.to(a.device)

    @contextlib.contextmanager
    def visiting(self, keys):
        """Hold `keys`' tensors while the block runs (one read each), when they total at most
        `VISIT_BYTES` per model; else they are read on each use, as outside."""
        keys, width = [k for k in keys if k not in self.visit], torch.empty((), dtype=self.dtype).element_size()
        if self.held[0] is None and sum(self.numel[k] for k in keys) * width <= VISIT_BYTES:
            self.visit.update({k: self.pair(k) for k in keys})
        try:
            yield
        finally:
            for k in keys:
                self.visit.pop(k, None)
            if keys and self.held[0] is None:
                release_heap()

    def _factor_view(self, t: torch.Tensor, key: str) -> torch.Tensor:
        return t.reshape([n for a, e in enumerate(self.spec.axes_to_perm[key])
                          for n in (e.shape if isinstance(e, Blocked) else (t.shape[a],))])

    def _dim(self, key: str, slot) -> int:
        entries = self.spec.axes_to_perm[key]
        return sum(len(e.shape) if isinstance(e, Blocked) else 1 for e in entries[:slot.axis]) + slot.factor

    def terms(self, member: str, *, own: bool) -> list[tuple[str, int]]:
        """(key, slot index) of the member's terms; for an outer perm (`own`), only the slots that no
        child rides on (the others are the children's)."""
        out = []
        for key in self.keys_of.get(member, []):
            slots = self.slots[key]
            for i, s in enumerate(slots):
                if s.perm == member and not (own and any(t.outer == i for t in slots)):
                    out.append((key, i))
        return out

    def _term(self, member: str, key: str, i: int, perms) -> tuple[list[int], dict]:
        """(unit slot indices, the perms B is gathered with) of one term (module docstring)."""
        slots = self.slots[key]
        s = slots[i]
        mod = {t.perm: perms[t.perm] for t in slots}
        mod[member] = torch.arange(self.sizes[member])
        if s.outer is None:
            return [i], mod
        q = slots[s.outer].perm
        for t in slots:
            if t.outer == s.outer and t.perm != member:
                mod[t.perm] = source_ordered(perms[t.perm], perms[q])
        mod[q] = torch.arange(self.sizes[q])
        return [s.outer, i], mod

    def _product(self, member: str, key: str, unit: list[int], mod) -> torch.Tensor:
        slots = self.slots[key]
        a, b = self.pair(key)
        b = gather_slots(b, self.spec.axes_to_perm[key], slots, mod)
        dims = [self._dim(key, slots[j]) for j in unit]
        n = self.sizes[member]
        au = self._factor_view(a, key).movedim(dims, list(range(len(dims)))).reshape(n, -1)
        bu = self._factor_view(b, key).movedim(dims, list(range(len(dims)))).reshape(n, -1)
        self.work += au.numel() * n
        return (au @ bu.T).to("cpu")   # in the matching dtype: the group sums it in float64 (_group)

    def cost(self, member: str, perms: Mapping[str, torch.Tensor], *, own: bool = False,
             coupling: float = 1.0) -> torch.Tensor | None:
        """The member's cost [n, n] (float64, CPU), B's unit index in source order (module docstring),
        coupled tensors weighted by `coupling`; None when it has no term. Terms are summed in groups
        by the perms their gathers read; a group whose perms are unchanged since it was last built is
        taken from the cache (within `cache_bytes`): a visit rebuilds only what moved. A member of
        many groups keeps its total and updates it by the groups that moved (`self.totals`)."""
        groups: dict[tuple, list] = {}
        for key, i in self.terms(member, own=own):
            unit, mod = self._term(member, key, i, perms)
            deps = {self.slots[key][j].perm: mod[self.slots[key][j].perm]
                    for j in range(len(self.slots[key])) if j not in unit}
            groups.setdefault((member, own, tuple(sorted(deps))), []).append((key, unit, mod, deps))
        if not groups:
            return None
        held = self.totals.get((member, own))
        if held is not None and held[0] == coupling and held[1].keys() == groups.keys():
            moved = [g for g, terms in groups.items() if not _same(held[1][g][1], terms[0][3])]
            if 2 * len(moved) < len(groups):   # cheaper than a rebuild: each moved group at old and new perms
                total = held[2]
                for g in moved:
                    w = coupling if g[2] else 1.0
                    total.sub_(self._group(member, g, held[1][g][0], held[1][g][1]), alpha=w)
                    total.add_(self._group(member, g, groups[g], groups[g][0][3]), alpha=w)
                    held[1][g] = _frozen(groups[g])
                return total.clone()
        total = None
        for gkey, terms in groups.items():
            c = self._group(member, gkey, terms, terms[0][3])
            w = coupling if gkey[2] else 1.0   # a group reading other perms is coupled
            total = c * w if total is None else total.add_(c, alpha=w)
        if len(groups) >= TOTAL_GROUPS and (held is not None or total.numel() * 8 <= self.totals_left):
            self.totals_left -= 0 if held is not None else total.numel() * 8
            self.totals[(member, own)] = [coupling, {g: _frozen(t) for g, t in groups.items()}, total.clone()]
        return total

    def _group(self, member: str, gkey: tuple, terms: list, deps: dict) -> torch.Tensor:
        """One cost group's sum (float64) for the perms `deps` its terms were built with: from the
        cache when it holds them, else built (and cached within `cache_left`); never modified by callers."""
        hit = self.cache.get(gkey)
        if hit is not None and _same(hit[0], deps):
            return hit[1]
        c = None
        for key, unit, mod, _ in terms:
            x = self._product(member, key, unit, mod)
            c = x.to(torch.float64) if c is None else c.add_(x)   # converted as it is added: no float64 copy
            del x
            if self.held[0] is None and key not in self.visit:
                release_heap()   # the tensors read for it are freed: their heap goes back (lazy sources)
        if hit is not None or c.numel() * 8 <= self.cache_left:
            self.cache_left -= 0 if hit is not None else c.numel() * 8
            self.cache[gkey] = ({d: v.clone() for d, v in deps.items()}, c)
        return c

    def objective(self, perms: Mapping[str, torch.Tensor], keys=None, coupling: float = 1.0) -> float:
        """Σ <A_k, π(B_k)> over `keys` (default every permuted tensor), float64-accumulated, coupled
        tensors weighted by `coupling` (1: the true objective)."""
        total = 0.0
        for key in self.keys if keys is None else keys:
            dot = self._dot(key, perms)
            total += coupling * dot if self.coupled[key] else dot
        return total

    def _dot(self, key: str, perms: Mapping[str, torch.Tensor]) -> float:
        read = {s.perm: perms[s.perm] for s in self.slots[key]}
        seen = self.dots.setdefault(key, [])
        for was, dot in seen:
            if all(torch.equal(v, read[p]) for p, v in was.items()):
                return dot
        a, b = self.pair(key)
        self.work += a.numel()
        buffers = tuple(torch.empty(1 << 17, dtype=torch.float64, device=a.device) for _ in range(2))
        dot = dot64(a, gather_slots(b, self.spec.axes_to_perm[key], self.slots[key], perms), buffers)
        if self.held[0] is None and key not in self.visit:
            del a, b
            release_heap()
        seen.insert(0, ({p: v.clone() for p, v in read.items()}, dot))
        del seen[2:]
        return dot


def _same(was: Mapping[str, torch.Tensor], now: Mapping[str, torch.Tensor]) -> bool:
    return was.keys() == now.keys() and all(torch.equal(v, now[d]) for d, v in was.items())


def _frozen(terms: list) -> tuple[list, dict]:
    """A group's terms and the perms they read, copied (the caller's perms may be replaced later)."""
    return ([(key, unit, {p: v.clone() for p, v in mod.items()}, None) for key, unit, mod, _ in terms],
            {d: v.clone() for d, v in terms[0][3].items()})


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
    x the family visits made before it. On lazy checkpoints (each visit reads its tensors from the
    shards) also within `REFINE_WORK` x the work done before it (`NestedCosts.work`: multiply-adds
    and elements read), so a kick whose re-descent costs a pass over the model is counted as such.
    With `track` (as `descend`'s, for `perms`), a trial revisits only the families that the kick
    reaches. Returns (perms, sweeps run)."""
    budget, start, sweeps = REFINE_BUDGET * prob.stats["visits"], prob.stats["visits"], 0
    lazy = prob.costs.held[0] is None and is_lazy(prob.costs.sources[0])
    work_budget, work0 = REFINE_WORK * prob.costs.work, prob.costs.work
    for _ in range(passes):
        for i in torch.randperm(len(prob.fams), generator=gen).tolist():
            if prob.stats["visits"] - start >= budget or (lazy and prob.costs.work - work0 >= work_budget):
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
