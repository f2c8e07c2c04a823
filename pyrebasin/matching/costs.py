"""The cost provider of weight matching: each perm group's LAP cost Σ W_A·W̃_Bᵀ and the objective, with
the float64 cost cache, rank-|S| updates and drift accounting that keep later sweeps cheap.
Tensors are reached only through `WeightCosts.tensors(keys)`, so a subclass can stream them (streamed.py).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import ops
from ..distributed import all_reduce_sum_, is_distributed, owners, rank_and_world
from ..spec import Blocked, PermutationSpec, axis_index, check_permutations

__all__ = ["WeightCosts", "SPLIT_MIN_BYTES", "dot64"]

# Under a process group, a problem whose float64 cost matrices (8·Σ n_p² bytes) stay below this runs
# whole on every rank: the same result, no message per LAP (whose latency would dominate small groups).
SPLIT_MIN_BYTES = 64 << 20


@dataclass
class _Term:
    """One (param, axis[, factor]) of a perm group; `views` gives A's unit matrix and B viewed with the
    group's units first, from the two tensors (so they need not be held)."""

    param: str
    axis: int
    perm: str
    shape: tuple                               # of B's view (units first)
    dims: list                                 # per view dim > 0: ("flat", entry) | ("perm", name) | None
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


def _term_deps(dims) -> frozenset:
    deps = set()
    for d in dims:
        if d is None:
            continue
        if d[0] == "perm":
            deps.add(d[1])
        else:
            deps.update(p for p in ([d[1]] if isinstance(d[1], str) else d[1].perms) if p is not None)
    return frozenset(deps)


def dot64(x: torch.Tensor, y: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor]) -> float:
    """<x, y> accumulated in float64 (float32 products are exact in float64), converted through two
    reused cache-sized buffers instead of two full-size float64 copies."""
    x, y = x.reshape(-1), y.reshape(-1)
    if x.dtype == torch.float64:
        return float(torch.dot(x, y))
    ba, bb = buffers
    chunk, total = ba.numel(), 0.0
    for s in range(0, x.numel(), chunk):
        m = min(chunk, x.numel() - s)
        ba[:m].copy_(x[s:s + m])
        bb[:m].copy_(y[s:s + m])
        total += float(torch.dot(ba[:m], bb[:m]))
    return total


class WeightCosts:
    """Cost matrices of one weight-matching problem, for the perms it holds (`perms`, on the tensors'
    device; `set_perm` changes one group).

    The terms that no other perm touches are summed once; the others gather B along its other
    permuted axes in one fused `permute_multi` call, then one GEMM each. Later sweeps change few
    units, so each group's cost (constant + weight x the terms that read other perms) is cached in
    float64 (within `cache_bytes`) with the gather indices it was built from; when a term's indices
    changed on one axis at few positions S (at most 3/5 of the axis), it is updated by the rank-|S|
    product A_S (B[new S] - B[old S])ᵀ instead of a full GEMM. A full rebuild happens when the change
    is larger or the updates add up to two full axes (bounding the rounding drift)."""

    def __init__(self, spec: PermutationSpec, state_a: Mapping[str, torch.Tensor],
                 state_b: Mapping[str, torch.Tensor], *, cache_bytes: int = 1 << 30, group=None):
        if getattr(spec, "nested", None):
            raise ValueError(f"{type(self).__name__}: the spec has nested perms ({sorted(spec.nested)[:3]}...); "
                             "weight_matching matches them family by family (matching.nested_weight.NestedCosts)")
        meta_a, meta_b = self.describe(state_a, spec), self.describe(state_b, spec)
        for name, state in (("state_a", meta_a), ("state_b", meta_b)):
            missing = [k for k in spec.axes_to_perm if k not in state]
            if missing:
                raise ValueError(f"weight_matching: {name} lacks {missing[:5]} (named in the spec)")
        sizes, sizes_b = spec.perm_sizes(meta_a), spec.perm_sizes(meta_b)  # both validated against the spec
        for key in spec.axes_to_perm:
            if meta_a[key].shape != meta_b[key].shape:
                raise ValueError(f"weight_matching: {key!r} has shape {list(meta_a[key].shape)} in A "
                                 f"but {list(meta_b[key].shape)} in B")
        if sizes != sizes_b:
            raise ValueError(f"weight_matching: perm sizes differ between A ({sizes}) and B ({sizes_b})")
        fixed = set(spec.fixed)  # a property that walks the spec: once, not per key
        permuted = [k for k in spec.axes_to_perm if k not in fixed]
        for k in permuted:
            for name, t in (("A", meta_a[k]), ("B", meta_b[k])):
                if not t.is_floating_point():
                    raise TypeError(f"weight_matching: {name}[{k!r}] is {t.dtype}; permuted tensors must be floating")
        # bf16/fp16 weights are matched in float32 (converted once, or per block when streamed).
        dtype = torch.float64 if any(meta_a[k].dtype == torch.float64 for k in permuted) else torch.float32
        self.spec, self.sizes, self.dtype, self.keys = spec, sizes, dtype, permuted
        # Under a process group each rank builds, caches and solves the groups it owns (whole groups:
        # every cost is summed as in one process) and computes the objective's dots of the tensors
        # it owns; it converts and holds only the tensors those read.
        big = 8 * sum(n * n for n in sizes.values()) >= SPLIT_MIN_BYTES
        self.group = group if big and is_distributed(group) else False
        self.rank, world = rank_and_world(self.group)
        pairs_of = spec.perm_to_axes
        self.owner = owners({p: sum(n * meta_b[k].numel() for k, _ in pairs_of.get(p, ())) for p, n in sizes.items()},
                            world)
        first = {}  # a tensor's objective dot goes to the owner of the first group reading it: no extra copy
        for p, pairs in pairs_of.items():
            for k, _ in pairs:
                first.setdefault(k, p)
        self.own_keys = [k for k in permuted if (self.owner[first[k]] if k in first else 0) == self.rank]
        needed = set(self.own_keys) | {k for p, pairs in pairs_of.items() if self.owns(p) for k, _ in pairs}
        self.device = self.hold(state_a, state_b, [k for k in permuted if k in needed], dtype)
        self.terms: dict[str, list[_Term]] = {p: [] for p in sizes}
        deps: dict[str, set] = {p: set() for p in sizes}
        for perm, pairs in pairs_of.items():
            for key, axis in pairs:
                probe = torch.empty(meta_b[key].shape, device="meta")  # its dims only
                view, dims = _expanded_view(probe, spec.axes_to_perm[key], axis, spec.factor(key, axis, perm))
                deps[perm].update(_term_deps(dims))
                if self.owns(perm):
                    self.terms[perm].append(_Term(key, axis, perm, tuple(view.shape), dims, _term_deps(dims)))
        self.perms = {p: torch.arange(n, device=self.device) for p, n in sizes.items()}
        self.coupled = {p: [t for t in ts if t.deps] for p, ts in self.terms.items()}
        self.constant: dict[str, torch.Tensor | None] = {}
        self.cache: dict[str, tuple] = {}  # perm -> (float64 cost, per-term indices, drift, coupling weight)
        self.cache_left = cache_bytes
        # Copies kept for speed alone (`_moved`) use what the cost cache and A's unit matrices never can (each group's
        # cost once, each term's A once): never displacing those, they change no caching decision (hence no result).
        self.extra_left = cache_bytes - 8 * sum(n * n for p, n in sizes.items() if self.owns(p)) - sum(
            math.prod(meta_a[t.param].shape) * (8 if dtype == torch.float64 else 4) for ts in self.terms.values()
            for t in ts)
        self._a_cache: dict[tuple, torch.Tensor] = {}  # (param, axis, perm) -> A's unit matrix (A never changes)
        self._moved_cache: dict[tuple, tuple] = {}  # (param, axis, perm, dim) -> A's and B's views, dim first, copied
        fixed_terms = {p: [t for t in ts if not t.deps] for p, ts in self.terms.items()}
        self.constant.update(dict.fromkeys(sizes))
        for _, views in self._views([t for ts in fixed_terms.values() for t in ts]):
            for t, a_units, b_view in views:
                prod = (a_units @ b_view.reshape(b_view.shape[0], -1).T).to(torch.float64)
                c = self.constant[t.perm]
                self.constant[t.perm] = prod if c is None else c.add_(prod)
        self.version = dict.fromkeys(sizes, 0)
        self._deps = {p: sorted(deps[p]) for p in sizes}
        self._dot_cache: dict[str, tuple] = {}  # key -> (versions of its perms, its dot) for the held perms
        self._buffers = None  # dot64's two float64 chunk buffers
        read_by: dict[str, set] = {}
        for p, pairs in pairs_of.items():
            for k, _ in pairs:
                read_by.setdefault(k, set()).add(p)
        self._key_perms = {k: sorted(read_by.get(k, ())) for k in self.own_keys}

    def owns(self, p: str) -> bool:
        """Whether this rank builds and solves group `p` (always True outside a process group)."""
        return self.owner[p] == self.rank

    # --- how tensors are reached (the hooks a streaming provider overrides) ---
    @staticmethod
    def describe(state: Mapping[str, torch.Tensor], spec: PermutationSpec) -> Mapping[str, torch.Tensor]:
        """Tensors (or meta tensors) giving the shape and dtype of each spec key of `state`."""
        return state

    def hold(self, state_a, state_b, keys: list[str], dtype: torch.dtype) -> torch.device:
        """Keep what `tensors(keys)` needs; returns the device of the costs. Here: converted copies in memory."""
        self.a = {k: state_a[k].detach().to(dtype) for k in keys}
        self.b = {k: state_b[k].detach().to(device=self.a[k].device, dtype=dtype) for k in keys}
        return state_a[self.keys[0]].device if self.keys else torch.device("cpu")

    def tensors(self, keys: list[str]):
        """Yields (A tensors, B tensors) by key, in `self.dtype`, for blocks of `keys` (here: one block)."""
        yield {k: self.a[k] for k in keys}, {k: self.b[k] for k in keys}

    def _views(self, terms: list[_Term]):
        """(block's B tensors, [(term, A unit matrix, B view)]) per block of the terms' tensors."""
        for a, b in self.tensors(list(dict.fromkeys(t.param for t in terms))):
            views = []
            for t in terms:
                if t.param in b:
                    view, _ = _expanded_view(b[t.param], self.spec.axes_to_perm[t.param], t.axis,
                                             self.spec.factor(t.param, t.axis, t.perm))
                    views.append((t, self._a_units(t, a[t.param]), view))
            yield b, views

    def _moved(self, t: _Term, d: int, a_units: torch.Tensor, b: torch.Tensor, view: torch.Tensor):
        """(A's unit matrix, B's `view`) of term `t`, each viewed as `view`'s shape with dim `d` moved first.
        Copied contiguous and kept (within `extra_left` of the byte budget) when A and B are held in memory
        (`hold`; they never change, their perms are applied by gathers): a rank-|S| update along `d` then
        gathers whole rows, not strided columns (~3x faster on n = 512). Else the views themselves."""
        key = (t.param, t.axis, t.perm, d)
        hit = self._moved_cache.get(key)
        if hit is not None:
            return hit
        pair = (a_units.reshape(view.shape).movedim(d, 0), view.movedim(d, 0))
        nbytes = 2 * view.numel() * view.element_size()
        if getattr(self, "b", {}).get(t.param) is not b or self._a_cache.get(key[:3]) is not a_units or \
                nbytes > self.extra_left:
            return pair
        self.extra_left -= nbytes
        hit = self._moved_cache[key] = tuple(x.contiguous() for x in pair)
        return hit

    def _a_units(self, t: _Term, a: torch.Tensor) -> torch.Tensor:
        """A's unit matrix of term `t`. Kept when A is held in memory (`hold`): a view as it is, a
        transposed copy while it fits the cost cache's byte budget (every cost build and update
        reads it; a streamed A is converted per block and never kept)."""
        key = (t.param, t.axis, t.perm)
        hit = self._a_cache.get(key)
        if hit is not None:
            return hit
        if getattr(self, "a", {}).get(t.param) is not a:
            return self.spec.unit_matrix(a, t.param, t.axis, t.perm)
        if isinstance(self.spec.axes_to_perm[t.param][t.axis], Blocked) or t.axis == 0:
            units = self.spec.unit_matrix(a, t.param, t.axis, t.perm)
        else:  # the same matrix, copied as [before, units, after] -> [units, before, after] (3-D: faster)
            n, after = a.shape[t.axis], math.prod(a.shape[t.axis + 1:])
            units = a.reshape(-1, n, after).transpose(0, 1).contiguous().reshape(n, -1)
        shared = units.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
        nbytes = 0 if shared else units.numel() * units.element_size()
        if nbytes <= self.cache_left:
            self.cache_left -= nbytes
            self._a_cache[key] = units
        return units

    def set_perm(self, p: str, perm: torch.Tensor) -> None:  # group `p` takes `perm`: the costs reading it change
        self.perms[p] = perm.to(self.device)
        self.version[p] += 1

    def snapshot(self, p: str) -> tuple:  # a value that changes whenever a perm that group `p`'s cost reads changes
        return tuple(self.version[d] for d in self._deps[p])

    def objective(self, perms: Mapping[str, torch.Tensor] | None = None) -> float:
        """Σ over permuted tensors of <W_A, π(W_B)>, in float64 (π: `perms`, default the held ones),
        one tensor permuted at a time (never a permuted copy of the model)."""
        if perms is not None:
            check_permutations(self.spec, perms, self.sizes)
        perms = perms if perms is not None else self.perms
        dots = self.dots(perms) if self.own_keys else {}
        if self.group is not False:  # every rank's dots (each tensor's on one rank, zeros elsewhere: exact)
            vec = torch.tensor([dots.get(k, 0.0) for k in self.keys], dtype=torch.float64)
            dots = dict(zip(self.keys, all_reduce_sum_([vec], self.group)[0].tolist()))
        return sum(dots[k] for k in self.keys)

    def dots(self, perms: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """<A_k, π(B_k)> in float64 for this rank's tensors k of the objective. With the held perms,
        a tensor none of whose perms changed since its last dot keeps that value (the same number:
        each sweep then pays only for the tensors it moved)."""
        held = perms is self.perms
        stamp = {k: tuple(self.version[p] for p in self._key_perms[k]) for k in self.own_keys} if held else {}
        out = {k: hit[1] for k in stamp if (hit := self._dot_cache.get(k)) is not None and hit[0] == stamp[k]}
        todo = [k for k in self.own_keys if k not in out]
        if todo:
            if self._buffers is None:  # kept: 2 MiB allocated and faulted in at every call cost ~25% of the objective
                self._buffers = tuple(torch.empty(1 << 17, dtype=torch.float64, device=self.device) for _ in range(2))
            for a, b in self.tensors(todo):
                for k in b:
                    out[k] = dot64(a[k], self.permuted(k, b[k], perms), self._buffers)
                    if held:
                        self._dot_cache[k] = (stamp[k], out[k])
        return out

    def permuted(self, key: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One tensor of B with every permuted axis gathered (one fused `permute_multi` call)."""
        indices, axes = [], []
        for axis, entry in enumerate(self.spec.axes_to_perm[key]):
            idx = axis_index(entry, perms, tensor.shape[axis], tensor.device)
            if idx is not None:
                indices.append(idx)
                axes.append(axis)
        if not indices:
            return tensor
        return ops.permute_multi([tensor], indices, [0] * len(indices), axes)[0]

    def _indices(self, t: _Term) -> list:
        """(dim of b_view, gather index) for each dim that a perm touches."""
        out, dev = [], self.device
        for d, spec_dim in enumerate(t.dims, start=1):
            if spec_dim is None:
                continue
            kind, what = spec_dim
            idx = self.perms[what].to(dev) if kind == "perm" else axis_index(what, self.perms, t.shape[d], dev)
            if idx is not None:
                out.append((d, idx))
        return out

    @staticmethod
    def _gather(x: torch.Tensor, others) -> torch.Tensor:  # `x` gathered along the other (unchanged) permuted dims
        for d, idx in others:
            x = x.index_select(d, idx)
        return x

    def _update(self, var, total, old, new, weight: float) -> float | None:
        """Rank-|S| updates of the cached `total` in place (scaled by `weight`); the drift they add
        (changed share of an axis), or None when a term changed on several dims or too many
        positions (then rebuild)."""
        plans = []
        for t, o, nw in zip(var, old, new):
            changed = [(d, io, inew) for (d, io), (_, inew) in zip(o, nw) if not torch.equal(io, inew)]
            if not changed:
                continue
            if len(changed) > 1:
                return None
            d, io, inew = changed[0]
            pos = (io != inew).nonzero().flatten()
            if 5 * pos.numel() > 3 * io.numel():
                return None
            plans.append((t, d, pos, io, inew, [(d2, i2) for d2, i2 in nw if d2 != d]))
        drift = 0.0
        plan_of = {id(plan[0]): plan for plan in plans}
        for block, views in self._views([plan[0] for plan in plans]):
            for t, a_units, b_view in views:
                _, d, pos, io, inew, others = plan_of[id(t)]
                n = b_view.shape[0]
                thin = pos.numel() * (b_view.numel() // (n * b_view.shape[d])) <= 512
                # rows of A's and B's views with dim d first (kept contiguous: `_moved`), laid out back as
                # [n, ...] contiguous: the GEMM's operands as gathered along dim d of the views themselves
                a_d, b_d = self._moved(t, d, a_units, block[t.param], b_view)
                dtype = torch.float64 if thin else a_d.dtype
                a_s = a_d.index_select(0, pos).movedim(0, d).to(dtype, memory_format=torch.contiguous_format)
                diff = b_d.index_select(0, inew[pos]) - b_d.index_select(0, io[pos])
                diff = self._gather(diff, [(d2 + 1 if d2 < d else d2, i2) for d2, i2 in others])
                a_s, diff = a_s.reshape(n, -1), diff.movedim(0, d).to(dtype, memory_format=torch.contiguous_format)
                diff = diff.reshape(n, -1)
                if thin:  # thin update: float64 GEMM straight into the cache, no n×n temporary
                    total.addmm_(a_s, diff.T, alpha=weight)
                else:
                    total.add_(a_s @ diff.T, alpha=weight)
                drift += pos.numel() / io.numel()
        return drift

    def cost(self, p: str, coupling: float = 1.0) -> torch.Tensor:
        """Group `p`'s cost matrix, float64, on the tensors' device: constant terms + `coupling` x the
        terms that read other perms (1.0: the true objective's cost). May be the cached tensor
        itself: read it, never modify it. Under a process group, only for a group this rank owns."""
        if not self.owns(p):
            raise ValueError(f"WeightCosts.cost: group {p!r} is built on rank {self.owner[p]}, not on rank {self.rank}")
        n = self.sizes[p]
        base = self.constant[p]
        var = self.coupled[p]
        if not var:
            return base if base is not None else torch.zeros(n, n, dtype=torch.float64, device=self.device)
        new = [self._indices(t) for t in var]
        if p in self.cache:
            total, old, drift, weight = self.cache[p]
            if weight != coupling and weight != 0.0:  # a new phase: rescale the coupling part in place
                if base is not None:
                    total.sub_(base)
                total.mul_(coupling / weight)
                if base is not None:
                    total.add_(base)
                weight = coupling
            if weight == coupling:
                step = self._update(var, total, old, new, weight)
                if step is not None and drift + step < 2.0:
                    self.cache[p] = (total, new, drift + step, weight)
                    return total
            self.cache_left += total.numel() * 8
            del self.cache[p]
        index_of = {id(t): idx for t, idx in zip(var, new)}
        c = None
        for _, views in self._views(var):  # block by block: the gathered copies of one block at a time
            tensors, indices, owners, axes = [], [], [], []
            for j, (t, _, b_view) in enumerate(views):
                tensors.append(b_view)
                for d, i in index_of[id(t)]:
                    indices.append(i)
                    owners.append(j)
                    axes.append(d)
            gathered = ops.permute_multi(tensors, indices, owners, axes)
            for (t, a_units, _), g in zip(views, gathered):
                g2 = g.reshape(n, -1)
                c = a_units @ g2.T if c is None else c.addmm_(a_units, g2.T)
            del gathered, views
        total = c.to(torch.float64).mul_(coupling)
        if base is not None:
            total.add_(base)
        if n * n * 8 <= self.cache_left:
            self.cache_left -= n * n * 8
            self.cache[p] = (total, new, 0.0, coupling)
        return total
