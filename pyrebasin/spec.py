"""PermutationSpec: which axes of which parameters each permutation group acts on (plain data),
with validation against a state dict, and apply / random / invert / compose of permutations.
"""
from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from . import ops
from .nested import (check_nested_map, check_permutations, compose_permutations, gather_slots,  # noqa: F401
                     invert_permutation, merge_joint_axes, random_nested, tensor_slots)

__all__ = [
    "Blocked",
    "PermutationSpec",
    "apply_permutation",
    "random_permutation",
    "identity_permutation",
    "invert_permutation",
    "compose_permutations",
    "check_permutations",
    "axis_index",
]

Perms = dict[str, torch.Tensor]


def _size(s) -> int | None:
    """A positive int (numpy / 0-d integer tensors included), else None; never truncates a float."""
    if isinstance(s, bool):
        return None
    try:
        n = operator.index(s)
    except TypeError:
        return None
    return n if n >= 1 else None


@dataclass(frozen=True)
class Blocked:
    """An axis that is the row-major flattening of `shape`; `perms[i]` permutes factor i (None: not).

    conv -> flatten -> linear: the linear input axis is Blocked((C, H*W), ("P_conv", None));
    attention heads: q_proj's output axis is Blocked((heads, head_dim), ("P_heads", "P_qk")).
    """

    shape: tuple[int, ...]
    perms: tuple[str | None, ...]

    def __post_init__(self):
        for what, value in (("shape", self.shape), ("perms", self.perms)):
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise TypeError(f"Blocked: {what} must be a tuple, got {value!r}")
        # int() would turn 2.9 into 2 (and True into 1): a wrong factorisation, silently
        bad = [s for s in self.shape if _size(s) is None]
        if bad:
            raise ValueError(f"Blocked: shape {tuple(self.shape)!r} must hold positive ints, got {bad[0]!r}")
        bad_names = [p for p in self.perms if p is not None and (not isinstance(p, str) or not p)]
        if bad_names:
            raise TypeError(f"Blocked: perms {tuple(self.perms)!r} must be perm names (non-empty str) or None, "
                            f"got {bad_names[0]!r}")
        object.__setattr__(self, "shape", tuple(_size(s) for s in self.shape))
        object.__setattr__(self, "perms", tuple(self.perms))
        if len(self.shape) != len(self.perms):
            raise ValueError(f"Blocked: shape {self.shape} and perms {self.perms} differ in length")
        named = [p for p in self.perms if p is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"Blocked: a perm appears twice in {self.perms}")


AxisEntry = str | Blocked | None


def _entry_perms(entry: AxisEntry) -> list[tuple[str, int]]:
    """(perm name, factor) pairs of one axis entry."""
    if entry is None:
        return []
    if isinstance(entry, str):
        return [(entry, 0)]
    return [(p, f) for f, p in enumerate(entry.perms) if p is not None]


@dataclass
class PermutationSpec:
    """Permutation symmetries of a model, as plain data.

    `axes_to_perm[param]` has one entry per axis of that parameter (or buffer): a perm name, a
    `Blocked` factorisation, or None. A key whose entries are all None is declared *fixed*; every
    key of the state dict must appear, so nothing is left out by accident. `fixed_reasons` may say
    why a key is fixed (shown in reports). `nested[P] = Q` declares P nested under Q (`pyrebasin.nested`):
    P's units come in |Q| blocks of m that move as wholes following Q, each block permuted freely.
    """

    axes_to_perm: dict[str, tuple[AxisEntry, ...]]
    fixed_reasons: dict[str, str] = field(default_factory=dict)
    nested: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.axes_to_perm, Mapping):
            raise TypeError(f"axes_to_perm must be a dict param name -> axis entries, got "
                            f"{type(self.axes_to_perm).__name__}")
        for key, entries in self.axes_to_perm.items():
            if not isinstance(key, str):
                raise TypeError(f"spec key {key!r} must be a str (a state-dict key)")
            # tuple("PQ") would be ('P', 'Q'): a perm name per character, on two axes
            if isinstance(entries, (str, bytes, Blocked)) or not isinstance(entries, (tuple, list)):
                raise TypeError(f"spec entry for {key!r} must be a tuple with one entry per axis, got "
                                f"{entries!r}" + (f" (for one axis write ({entries!r},))"
                                                  if isinstance(entries, (str, Blocked)) else ""))
            for entry in entries:
                if entry is not None and not isinstance(entry, (str, Blocked)):
                    raise TypeError(f"spec entry for {key!r}: expected str, Blocked or None, got {entry!r}")
                if entry == "":
                    raise ValueError(f"spec entry for {key!r}: a perm name must not be empty")
        self.axes_to_perm = {k: tuple(v) for k, v in self.axes_to_perm.items()}
        if not isinstance(self.fixed_reasons, Mapping):
            raise TypeError(f"fixed_reasons must be a dict key -> reason, got {type(self.fixed_reasons).__name__}")
        self.nested = check_nested_map(self.nested, self.perm_to_axes)

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """perm name -> [(param name, axis)] (the inverse map), in spec order."""
        out: dict[str, list[tuple[str, int]]] = {}
        for key, entries in self.axes_to_perm.items():
            for axis, entry in enumerate(entries):
                for perm, _ in _entry_perms(entry):
                    out.setdefault(perm, []).append((key, axis))
        return out

    @property
    def perm_names(self) -> list[str]:
        return list(self.perm_to_axes)

    @property
    def fixed(self) -> list[str]:
        """Keys that no permutation touches."""
        return [k for k, e in self.axes_to_perm.items() if all(x is None for x in e)]

    def factor(self, param: str, axis: int, perm: str) -> int:
        """Which factor of (param, axis) the perm acts on (0 unless the axis is Blocked)."""
        for p, f in _entry_perms(self.axes_to_perm[param][axis]):
            if p == perm:
                return f
        raise KeyError(f"perm {perm!r} does not act on {param!r} axis {axis}")

    def unit_matrix(self, tensor: torch.Tensor, param: str, axis: int, perm: str) -> torch.Tensor:
        """View `tensor` (the value of `param`) as [units of `perm`, everything else] (a reshape +
        movedim; copies only if needed). Row i holds every entry that unit i owns on that axis. An
        inner slot of a nested perm gives rows (outer block k, offset g) -> unit k*m + g."""
        entry = self.axes_to_perm[param][axis]
        slots = tensor_slots(param, self.axes_to_perm[param], tensor.shape, self.nested)
        inner = [s for s in slots if s.perm == perm and s.axis == axis and s.outer is not None]
        if inner:
            o, s = slots[inner[0].outer], inner[0]
            dims = [self._dim(param, o.axis, o.factor), self._dim(param, s.axis, s.factor)]
            return self._factor_view(tensor, param).movedim(dims, [0, 1]).reshape(o.size * s.size, -1)
        if isinstance(entry, Blocked):
            f = self.factor(param, axis, perm)
            shape = tensor.shape[:axis] + entry.shape + tensor.shape[axis + 1:]
            return tensor.reshape(shape).movedim(axis + f, 0).reshape(entry.shape[f], -1)
        return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)

    def _dim(self, param: str, axis: int, factor: int) -> int:
        """The dim of (axis, factor) in `_factor_view`."""
        entries = self.axes_to_perm[param]
        return sum(len(e.shape) if isinstance(e, Blocked) else 1 for e in entries[:axis]) + factor

    def _factor_view(self, tensor: torch.Tensor, param: str) -> torch.Tensor:
        """`tensor` reshaped so that every Blocked axis is split into its factors."""
        entries = self.axes_to_perm[param]
        return tensor.reshape([n for a, e in enumerate(entries)
                               for n in (e.shape if isinstance(e, Blocked) else (tensor.shape[a],))])

    def perm_sizes(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Validate the spec against a state dict and return each perm's number of units.

        Raises ValueError naming the key, axis and sizes on: a spec key missing from the state dict,
        a state dict key the spec does not declare, a rank mismatch, a Blocked shape that does not
        multiply to the axis size, or two axes of one perm that disagree in size.
        """
        missing = [k for k in self.axes_to_perm if k not in state_dict]
        if missing:
            raise ValueError(f"spec names keys absent from the state dict: {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}")
        undeclared = [k for k in state_dict if k not in self.axes_to_perm]
        if undeclared:
            raise ValueError(
                f"state dict keys not declared in the spec (declare them, with None axes if fixed): "
                f"{undeclared[:8]}{' ...' if len(undeclared) > 8 else ''}")
        seen: dict[tuple[str, bool], tuple[int, str, int]] = {}  # (perm, inner slot) -> (units, key, axis)
        for key, entries in self.axes_to_perm.items():
            if not isinstance(state_dict[key], torch.Tensor):
                raise TypeError(f"state dict value {key!r} is a {type(state_dict[key]).__name__}, not a Tensor")
            shape = tuple(state_dict[key].shape)
            if len(entries) != len(shape):
                raise ValueError(f"spec gives {len(entries)} axes for {key!r} but its shape is {list(shape)}")
            for axis, entry in enumerate(entries):
                if isinstance(entry, Blocked) and math.prod(entry.shape) != shape[axis]:
                    raise ValueError(f"{key!r} axis {axis} has size {shape[axis]} but its Blocked shape "
                                     f"{entry.shape} multiplies to {math.prod(entry.shape)}")
            for s in tensor_slots(key, entries, shape, self.nested):
                first = seen.setdefault((s.perm, s.outer is not None), (s.size, key, s.axis))
                if first[0] != s.size:
                    n0, k0, a0 = first
                    what = " per block (an inner slot of a nested perm)" if s.outer is not None else ""
                    raise ValueError(f"perm {s.perm!r}: {key!r} axis {s.axis} has {s.size} units{what} but "
                                     f"{k0!r} axis {a0} has {n0}")
        sizes = {p: n for (p, inner), (n, _, _) in seen.items() if not inner}
        for (p, inner), (m, key, axis) in seen.items():  # nested perms: |P| = m * |Q|
            if p in self.nested:
                q = self.nested[p]
                if inner and sizes.setdefault(p, m * sizes[q]) != m * sizes[q]:
                    raise ValueError(f"nested perm {p!r}: {key!r} axis {axis} has blocks of {m} units, so "
                                     f"|{p}| = {m} x |{q}| = {m * sizes[q]}, but a merged slot has {sizes[p]}")
                if sizes.get(p, 0) % sizes[q]:
                    raise ValueError(f"nested perm {p!r} has {sizes[p]} units, not a multiple of its outer "
                                     f"{q!r}'s {sizes[q]}")
        return {p: sizes[p] for p in dict.fromkeys(p for p, _ in seen)}

    def restrict(self, keys) -> "PermutationSpec":
        """The spec of a subset of keys (one safetensors shard, one pipeline stage)."""
        keys = list(keys)
        unknown = [k for k in keys if k not in self.axes_to_perm]
        if unknown:
            raise ValueError(f"keys not in the spec: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        axes = {k: self.axes_to_perm[k] for k in keys}
        used = {p for e in axes.values() for x in e for p, _ in _entry_perms(x)}
        return PermutationSpec(axes, {k: r for k, r in self.fixed_reasons.items() if k in set(keys)},
                               {p: q for p, q in self.nested.items() if p in used and q in used})

    def without_nesting(self, state_dict: Mapping[str, torch.Tensor]) -> "PermutationSpec":
        """The shared-perm subgroup as a plain spec: each nested P becomes one perm of m units shared
        by all blocks of its outer Q (a merged slot is split into (|Q|, m) factors). Perms found for it
        map back with `pyrebasin.nested.lift_shared(spec.nested, perms)`."""
        sizes, axes = self.perm_sizes(state_dict), {}
        for key, entries in self.axes_to_perm.items():
            merged = {(s.axis, s.factor) for s in tensor_slots(key, entries, state_dict[key].shape, self.nested)
                      if s.perm in self.nested and s.outer is None}
            new = list(entries)
            for axis, f in sorted(merged, reverse=True):
                e = new[axis]
                shape, perms = (list(e.shape), list(e.perms)) if isinstance(e, Blocked) else ([sizes[e]], [e])
                p = perms[f]
                shape[f:f + 1], perms[f:f + 1] = [sizes[self.nested[p]], sizes[p] // sizes[self.nested[p]]], \
                    [self.nested[p], p]
                new[axis] = Blocked(tuple(shape), tuple(perms))
            axes[key] = tuple(new)
        return PermutationSpec(axes, dict(self.fixed_reasons))

    # --- serialisation (plain JSON) ---
    def to_dict(self) -> dict:
        def enc(e):
            return {"shape": list(e.shape), "perms": list(e.perms)} if isinstance(e, Blocked) else e
        return {"axes_to_perm": {k: [enc(e) for e in v] for k, v in self.axes_to_perm.items()},
                "fixed_reasons": dict(self.fixed_reasons)} | ({"nested": dict(self.nested)} if self.nested else {})

    @classmethod
    def from_dict(cls, d: Mapping) -> "PermutationSpec":
        def dec(e):
            return Blocked(tuple(e["shape"]), tuple(e["perms"])) if isinstance(e, dict) else e
        return cls({k: tuple(dec(e) for e in v) for k, v in d["axes_to_perm"].items()},
                   dict(d.get("fixed_reasons", {})), dict(d.get("nested", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PermutationSpec":
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        return (f"PermutationSpec({len(self.perm_to_axes)} perms over {len(self.axes_to_perm)} keys, "
                f"{len(self.fixed)} fixed)")

    @classmethod
    def from_git_rebasin(cls, spec, **options) -> PermutationSpec:
        """A spec from git-re-basin's JAX format (options: `pyrebasin.interop.axes_from_git_rebasin`)."""
        from .interop import axes_from_git_rebasin
        reasons = spec.get("fixed_reasons", {}) if isinstance(spec, Mapping) else {}
        return cls(axes_from_git_rebasin(spec, **options), dict(reasons))

    def to_git_rebasin(self, **options) -> dict:
        """git-re-basin's format over flax keys and layout (`pyrebasin.interop.git_rebasin_from_axes`)."""
        from .interop import git_rebasin_from_axes
        if self.nested:
            raise ValueError(f"git-re-basin's format cannot state nested perms ({sorted(self.nested)} nested "
                             f"under {sorted(set(self.nested.values()))}): each of its perms acts on whole axes")
        return git_rebasin_from_axes(self.axes_to_perm, **options) | {"fixed_reasons": dict(self.fixed_reasons)}


def axis_index(entry: AxisEntry, perms: Mapping[str, torch.Tensor], size: int,
               device: torch.device | None = None, nested: Mapping[str, str] | None = None) -> torch.Tensor | None:
    """The flat gather index of one axis (None when nothing permutes it). With `nested` (the spec's),
    a nested perm after its outer perm in the same Blocked entry is gathered jointly with it."""
    if entry is None:
        return None
    if isinstance(entry, str):
        return perms[entry].to(device=device, dtype=torch.long)
    if all(p is None for p in entry.perms):
        return None
    slots = tensor_slots("<axis>", (entry,), (size,), nested or {})
    for s in slots:
        if s.outer is None and perms[s.perm].numel() != s.size:
            why = (f"an inner slot of a perm nested under {nested[s.perm]!r}, which is on another axis (use "
                   f"apply_permutation)" if s.perm in (nested or {}) else "an inner slot of a nested perm? pass "
                   "the spec's `nested`, or use apply_permutation")
            raise ValueError(f"perm {s.perm!r} has {perms[s.perm].numel()} units but acts on a factor of "
                             f"{s.size} ({why})")
    idx = torch.arange(size, device=device)
    return gather_slots(idx, (entry,), slots, perms).reshape(-1)


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                      state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every permuted axis gathered: `new = old.index_select(axis, perm)`;
    a nested perm's inner slot is gathered jointly with its outer perm's slot (`pyrebasin.nested`).

    The input is untouched; all tensors whose gathers are per axis (a joint gather within one Blocked
    axis is one flat index) go through one fused `permute_multi` call per device; a joint gather
    across two axes (stacked MoE experts) runs in torch. Fixed tensors are copied (no aliasing).
    """
    sizes = spec.perm_sizes(state_dict)
    check_permutations(spec, perms, sizes)
    keys = list(state_dict)
    by_device: dict[torch.device, list[int]] = {}
    for i, k in enumerate(keys):
        by_device.setdefault(state_dict[k].device, []).append(i)
    out: dict[str, torch.Tensor] = {}
    for device, members in by_device.items():
        tensors, indices, owners, axes, fused, shapes = [], [], [], [], [], []
        # One index tensor per distinct axis entry (a perm permutes many tensors): built once per call.
        index_of: dict[tuple[AxisEntry, int], torch.Tensor | None] = {}
        for i in members:
            key = keys[i]
            t = state_dict[key].resolve_conj().resolve_neg()
            entries = spec.axes_to_perm[key]
            slots = tensor_slots(key, entries, t.shape, spec.nested)
            if any(s.outer is not None and slots[s.outer].axis != s.axis for s in slots):
                merged = merge_joint_axes(entries, t.shape, slots, Blocked)
                if merged is None:  # a joint gather across non-adjacent axes (w2 [E, H, I]): torch
                    out[key] = gather_slots(t, entries, slots, perms)
                    continue
                entries, t = merged[0], t.reshape(merged[1])  # adjacent (w1 [E, I, H]): one flat axis
            shapes.append(state_dict[key].shape)
            fused.append(i)
            tensors.append(t)
            for axis, entry in enumerate(entries):
                if entry is None:
                    continue
                size = t.shape[axis]
                idx = index_of.get((entry, size), False)
                if idx is False:
                    idx = index_of[entry, size] = axis_index(entry, perms, size, device, spec.nested)
                if idx is not None:
                    indices.append(idx)
                    owners.append(len(tensors) - 1)
                    axes.append(axis)
        results = ops.permute_multi(tensors, indices, owners, axes)
        for i, r, shape in zip(fused, results, shapes):
            out[keys[i]] = r.reshape(shape)
    return {k: out[k] for k in keys}


def identity_permutation(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> Perms:
    return {p: torch.arange(n) for p, n in spec.perm_sizes(state_dict).items()}


def random_permutation(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor],
                       generator: torch.Generator | int | None = None) -> Perms:
    """A uniformly random permutation of every perm group (seeded by a Generator or an int); a nested
    perm is drawn uniformly among those following its outer perm (each block shuffled independently)."""
    if isinstance(generator, bool) or not (generator is None or isinstance(generator, (int, torch.Generator))):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    sizes = spec.perm_sizes(state_dict)  # outer perms first, then each nested one block by block
    perms = {p: torch.randperm(n, generator=generator) for p, n in sizes.items() if p not in spec.nested}
    for p, q in spec.nested.items():
        perms[p] = random_nested(perms[q], sizes[p] // sizes[q], generator)
    return {p: perms[p] for p in sizes}
