"""The costs and objective of one nested weight-matching problem (matching/nested_weight.py's descent):
each member's cost summed from A's and B's unit matrices in groups by the perms their gathers read,
cached, and, for a member of many groups (a residual stream's perm), kept as a total that is updated
by the groups that moved; the true objective from per-tensor dots remembered for their last two
arrangements. In-memory states are converted on use (or held), lazy ones read tensor by tensor."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from .._heap import release_heap
from ..nested import gather_slots, tensor_slots
from ..spec import Blocked, PermutationSpec
from .costs import dot64
from .nested import source_ordered

__all__ = ["NestedCosts", "is_lazy", "TOTAL_GROUPS", "VISIT_BYTES"]

TOTAL_GROUPS = 4  # a member with at least this many cost groups keeps its total, updated by the groups that moved
VISIT_BYTES = 256 << 20  # a family visit reads its tensors once when they total at most this (per model, converted)


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
        self.streamed = is_lazy(state_a)   # read from shards: freed heap is handed back after each read
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
            if keys and self.streamed:
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
            if self.streamed and key not in self.visit:
                release_heap()   # the tensors read for it are freed: their heap goes back
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
        if self.streamed and key not in self.visit:
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
