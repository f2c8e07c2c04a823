"""Nested permutations (`PermutationSpec.nested`): a perm P nested under Q moves blocks of m units as
wholes, following Q, and permutes freely inside each block (the wreath product S_m ≀ S_|Q|).

With the gather convention new[i] = old[perm[i]], a valid P satisfies P[k'*m + g'] // m == Q[k'].
P appears on a tensor either *inner* (a slot of size m, after a slot of Q in the same tensor: the pair
is gathered jointly, source (k, g) = divmod(P[k'*m + g'], m)) or *merged* (a slot of size |P| = m·|Q|,
gathered plainly by P). It also holds the checks of permutation values (`check_permutations`).
This module works on plain data (axis entries, names, tensors) so that
`spec` can build on it without an import cycle.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["check_permutations", "check_one_permutation", "all_permutations", "invert_permutation",
           "compose_permutations", "lift_shared", "Slot", "tensor_slots", "check_nested_map",
           "check_block_following", "random_nested", "joint_index", "gather_slots", "merge_joint_axes"]


@dataclass(frozen=True)
class Slot:
    """One permuted factor of one tensor: `axis`, `factor` (0 unless Blocked), its size, its perm,
    and `outer`: the index (in the tensor's slot list) of the slot of its outer perm when the slot is
    an inner slot of a nested perm (gathered jointly with it), else None."""

    axis: int
    factor: int
    size: int
    perm: str
    outer: int | None = None


def check_nested_map(nested, perm_names) -> dict[str, str]:
    """Validate `nested` (perm -> its outer perm) against the perms a spec uses; returns a plain dict."""
    if not isinstance(nested, Mapping):
        raise TypeError(f"nested must be a dict perm name -> outer perm name, got {type(nested).__name__}")
    names = set(perm_names)
    out = {}
    for p, q in nested.items():
        for what, v in (("perm", p), ("outer perm", q)):
            if not isinstance(v, str) or not v:
                raise TypeError(f"nested: {what} names must be non-empty str, got {v!r} (entry {p!r}: {q!r})")
        if p == q:
            raise ValueError(f"nested: perm {p!r} cannot be nested under itself")
        unknown = [v for v in (p, q) if v not in names]
        if unknown:
            raise ValueError(f"nested: {p!r} -> {q!r} names perms the spec does not use: {unknown}")
        if q in nested:
            raise ValueError(f"nested: {p!r} is nested under {q!r}, which is itself nested under "
                             f"{nested[q]!r}; only one level of nesting is supported")
        out[p] = q
    return out


def tensor_slots(key: str, entries, shape, nested: Mapping[str, str]) -> list[Slot]:
    """The permuted factors of one tensor in (axis, factor) order, each inner slot of a nested perm
    linked to the earlier slot of its outer perm. Blocked entries are duck-typed (`.shape`, `.perms`)."""
    raw: list[tuple[int, int, int, str]] = []
    for axis, entry in enumerate(entries):
        if entry is None:
            continue
        if isinstance(entry, str):
            raw.append((axis, 0, int(shape[axis]), entry))
        else:
            raw.extend((axis, f, int(s), p) for f, (s, p) in enumerate(zip(entry.shape, entry.perms))
                       if p is not None)
    slots: list[Slot] = []
    for axis, f, size, p in raw:
        outer = None
        q = nested.get(p)
        if q is not None:
            earlier = [i for i, s in enumerate(slots) if s.perm == q]
            if len(earlier) > 1:
                raise ValueError(f"{key!r}: nested perm {p!r} follows its outer perm {q!r}, which appears "
                                 f"on {len(earlier)} earlier axes; the joint gather would be ambiguous")
            outer = earlier[0] if earlier else None
        slots.append(Slot(axis, f, size, p, outer))
    return slots


def check_block_following(perms: Mapping[str, torch.Tensor], nested: Mapping[str, str],
                          sizes: Mapping[str, int]) -> None:
    """Each nested P moves whole blocks following its outer Q: P[k'*m + g'] // m == Q[k']."""
    for p, q in nested.items():
        if p not in sizes or q not in sizes:
            continue
        n, k = sizes[p], sizes[q]
        if n % k:
            raise ValueError(f"nested perm {p!r} has {n} units, not a multiple of its outer {q!r}'s {k}")
        m = n // k
        P, Q = perms[p].long(), perms[q].long().to(perms[p].device)
        bad = P.reshape(k, m).div(m, rounding_mode="floor").ne(Q.reshape(k, 1)).any(1)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"perm {p!r} does not follow its outer perm {q!r}: nested perms move blocks of {m} units "
                f"as wholes, but target block {b} (entries {b * m}..{b * m + m - 1}) takes units "
                f"{P[b * m:(b + 1) * m].tolist()} while {q!r}[{b}] = {int(Q[b])} (expected units "
                f"{int(Q[b]) * m}..{int(Q[b]) * m + m - 1} in any order)")


def random_nested(outer: torch.Tensor, m: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random perm nested under `outer` with blocks of m: block k' = outer[k']'s units, shuffled."""
    k = outer.numel()
    inner = torch.stack([torch.randperm(m, generator=generator) for _ in range(k)]) if k else \
        torch.empty(0, m, dtype=torch.long)
    return (outer.long().reshape(k, 1) * m + inner).reshape(-1)


def joint_index(outer: torch.Tensor, inners: list[torch.Tensor], ms: list[int]) -> torch.Tensor:
    """The flat gather index over the row-major product (outer, inner_1, ..., inner_n) of a joint
    gather: target (k', g_1', ...) reads source (outer[k'], inner_1[k'*m_1 + g_1'] % m_1, ...)."""
    k = outer.numel()
    n = len(ms)
    total = 1
    for m in ms:
        total *= m
    idx = outer.long().reshape([k] + [1] * n) * total
    stride = total
    for i, (p, m) in enumerate(zip(inners, ms)):
        stride //= m
        shape = [k] + [1] * n
        shape[i + 1] = m
        idx = idx + (p.long().to(outer.device).reshape(k, m) % m).reshape(shape) * stride
    return idx.reshape(-1)


def gather_slots(x: torch.Tensor, entries, slots: list[Slot], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Apply every slot's gather to `x` (pure torch): plain slots by their perm, each outer slot
    jointly with its inner slots (the dims moved together, merged, gathered by `joint_index`, restored)."""
    axis_shape: list[tuple[int, ...]] = []
    for axis, entry in enumerate(entries):
        axis_shape.append(tuple(entry.shape) if entry is not None and not isinstance(entry, str)
                          else (x.shape[axis],))
    first = [0]
    for s in axis_shape:
        first.append(first[-1] + len(s))
    y = x.reshape([n for s in axis_shape for n in s])
    dim = [first[s.axis] + s.factor for s in slots]
    kids: dict[int, list[int]] = {}
    for i, s in enumerate(slots):
        if s.outer is not None:
            kids.setdefault(s.outer, []).append(i)
    for i, s in enumerate(slots):
        if s.outer is None and i not in kids:
            y = y.index_select(dim[i], perms[s.perm].to(device=y.device, dtype=torch.long))
    for i, children in kids.items():
        dims = [dim[i]] + [dim[j] for j in children]
        rest = [d for d in range(y.dim()) if d not in dims]
        order = dims + rest
        z = y.permute(order)
        lead, tail = z.shape[:len(dims)], z.shape[len(dims):]
        idx = joint_index(perms[slots[i].perm].to(y.device), [perms[slots[j].perm] for j in children],
                          [slots[j].size for j in children])
        z = z.reshape((-1,) + tuple(tail)).index_select(0, idx).reshape(tuple(lead) + tuple(tail))
        back = [0] * len(order)
        for pos, d in enumerate(order):
            back[d] = pos
        y = z.permute(back)
    return y.reshape(x.shape).contiguous()


def merge_joint_axes(entries, shape, slots: list[Slot], blocked):
    """When every joint gather spans adjacent axes that all hold a slot of it, the entries and shape
    with those axes merged into one `blocked` (the Blocked class) axis, so that the joint gather is one
    flat index of that axis; else None."""
    groups: dict[int, set[int]] = {}
    for s in slots:
        if s.outer is not None:
            groups.setdefault(s.outer, {slots[s.outer].axis}).add(s.axis)
    spans = sorted((min(a), max(a)) for a in groups.values())
    if any(len(a) != max(a) - min(a) + 1 for a in groups.values()) or any(
            lo <= hi0 for (_, hi0), (lo, _) in zip(spans, spans[1:])):
        return None
    new_entries, new_shape, axis = [], [], 0
    for lo, hi in spans + [(len(entries), len(entries))]:
        new_entries += entries[axis:lo]
        new_shape += shape[axis:lo]
        if lo < len(entries):
            span = [(a, e, e is not None and not isinstance(e, str)) for a, e in enumerate(entries) if lo <= a <= hi]
            part = [e.shape if factored else (shape[a],) for a, e, factored in span]
            names = [e.perms if factored else (e,) for _, e, factored in span]
            named = [p for ps in names for p in ps if p is not None]
            if len(set(named)) != len(named):   # one perm on two merged axes: no single Blocked entry
                return None
            new_entries.append(blocked(tuple(n for p in part for n in p), tuple(p for ps in names for p in ps)))
            new_shape.append(math.prod(shape[lo:hi + 1]))
        axis = hi + 1
    return tuple(new_entries), tuple(new_shape)


def check_permutations(spec, perms: Mapping[str, torch.Tensor], sizes: Mapping[str, int]) -> None:
    """Every perm of the spec present, 1-D integer, of its group's size, and a true permutation; each
    nested perm follows its outer perm (`check_block_following`). `spec`: a `PermutationSpec`."""
    missing = [p for p in sizes if p not in perms]
    if missing:
        raise ValueError(f"permutations missing for perm groups {missing}")
    extra = [p for p in perms if p not in sizes]
    if extra:
        raise ValueError(f"permutations given for names the spec does not have: {extra}")
    by_device: dict[torch.device, list[str]] = {}
    for name, n in sizes.items():
        p = perms[name]
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"perm {name!r} must be a 1-D int64 tensor, got "
                             f"{getattr(p, 'dtype', type(p))} of shape {list(getattr(p, 'shape', []))}")
        if p.numel() != n:
            raise ValueError(f"perm {name!r} has {p.numel()} entries but its group has {n} units")
        by_device.setdefault(p.device, []).append(name)
    # All groups of a device in one batch (a dozen ops, however many groups): this runs on every
    # apply_permutation. Only when the batch fails is each group checked alone, for the message.
    for device, names in by_device.items():
        if not all_permutations(device, [perms[name] for name in names], [sizes[name] for name in names]):
            for name in names:
                check_one_permutation(name, perms[name], sizes[name])
    check_block_following(perms, getattr(spec, "nested", {}), sizes)


def all_permutations(device: torch.device, ps: list[torch.Tensor], ns: list[int]) -> bool:
    total = sum(ns)
    if total == 0:
        return True
    v = torch.cat([p.long() for p in ps])
    counts = torch.tensor(ns, device=device)
    starts = torch.tensor([0] + ns[:-1], device=device).cumsum(0)
    size_of = counts.repeat_interleave(counts, output_size=total)
    in_range = v.ge(0).logical_and_(v.lt(size_of))
    if not bool(in_range.all()):
        return False
    return int(torch.bincount(v + starts.repeat_interleave(counts, output_size=total), minlength=total).max()) <= 1


def check_one_permutation(name: str, p: torch.Tensor, n: int) -> None:
    if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
        raise TypeError(f"perm {name!r} must be an integer tensor, got {p.dtype}")
    seen = torch.zeros(n, dtype=torch.bool, device=p.device)
    if n and (int(p.min()) < 0 or int(p.max()) >= n):
        raise ValueError(f"perm {name!r} has values outside [0, {n})")
    seen[p.long()] = True
    if not bool(seen.all()):
        dup = torch.bincount(p.long().cpu(), minlength=n).gt(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"perm {name!r} is not a permutation: duplicated indices {dup}")


def _checked(perms: Mapping[str, torch.Tensor], what: str) -> None:
    """Each value a true permutation of 0..n-1 (argsort of duplicates or of floats is no inverse)."""
    if not isinstance(perms, Mapping):
        raise TypeError(f"{what} must be a dict perm name -> LongTensor, got {type(perms).__name__}")
    for name, p in perms.items():
        if not isinstance(p, torch.Tensor) or p.dim() != 1:
            raise ValueError(f"{what}: perm {name!r} must be a 1-D integer tensor, got "
                             f"{type(p).__name__ if not isinstance(p, torch.Tensor) else list(p.shape)}")
        check_one_permutation(name, p, p.numel())


def invert_permutation(perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """π⁻¹ for every group: applying perms then their inverse is the identity. Each value must be a
    permutation of 0..n-1 (TypeError / ValueError naming the group otherwise)."""
    _checked(perms, "invert_permutation")
    return {k: torch.argsort(p) for k, p in perms.items()}


def compose_permutations(first: Mapping[str, torch.Tensor],
                         second: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The single permutation equal to applying `first`, then `second` (= first[second]). Both must
    hold permutations over the same groups, of equal sizes per group."""
    _checked(first, "compose_permutations: first")
    _checked(second, "compose_permutations: second")
    if set(first) != set(second):
        raise ValueError(f"cannot compose perms over different groups: {sorted(set(first) ^ set(second))}")
    for k in first:  # first[second] with a shorter second would silently drop units
        if first[k].numel() != second[k].numel():
            raise ValueError(f"compose_permutations: perm {k!r} has {first[k].numel()} units in first but "
                             f"{second[k].numel()} in second")
    return {k: first[k][second[k].to(first[k].device)] for k in first}


def lift_shared(nested: Mapping[str, str], perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Perms of a spec's `without_nesting()` form as perms of the nested spec: a shared inner perm p of
    m units becomes P[k'*m + g'] = Q[k']*m + p[g'] (every block reordered alike, following Q)."""
    out = dict(perms)
    for p, q in nested.items():
        if p in perms and q in perms:
            m, outer = perms[p].numel(), perms[q].long()
            out[p] = (outer.reshape(-1, 1) * m + perms[p].long().to(outer.device).reshape(1, m)).reshape(-1)
    return out
