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
    why a key is fixed (shown in reports).
    """

    axes_to_perm: dict[str, tuple[AxisEntry, ...]]
    fixed_reasons: dict[str, str] = field(default_factory=dict)

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
        movedim; copies only if needed). Row i holds every entry that unit i owns on that axis."""
        entry = self.axes_to_perm[param][axis]
        if isinstance(entry, Blocked):
            f = self.factor(param, axis, perm)
            shape = tensor.shape[:axis] + entry.shape + tensor.shape[axis + 1:]
            return tensor.reshape(shape).movedim(axis + f, 0).reshape(entry.shape[f], -1)
        return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)

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
        sizes: dict[str, tuple[int, str, int]] = {}
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
                for perm, f in _entry_perms(entry):
                    n = entry.shape[f] if isinstance(entry, Blocked) else shape[axis]
                    if perm in sizes and sizes[perm][0] != n:
                        n0, k0, a0 = sizes[perm]
                        raise ValueError(f"perm {perm!r}: {key!r} axis {axis} has {n} units but "
                                         f"{k0!r} axis {a0} has {n0}")
                    sizes.setdefault(perm, (n, key, axis))
        return {p: n for p, (n, _, _) in sizes.items()}

    def restrict(self, keys) -> "PermutationSpec":
        """The spec of a subset of keys (one safetensors shard, one pipeline stage)."""
        keys = list(keys)
        unknown = [k for k in keys if k not in self.axes_to_perm]
        if unknown:
            raise ValueError(f"keys not in the spec: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        return PermutationSpec({k: self.axes_to_perm[k] for k in keys},
                               {k: r for k, r in self.fixed_reasons.items() if k in set(keys)})

    # --- serialisation (plain JSON) ---
    def to_dict(self) -> dict:
        def enc(e):
            return {"shape": list(e.shape), "perms": list(e.perms)} if isinstance(e, Blocked) else e
        return {"axes_to_perm": {k: [enc(e) for e in v] for k, v in self.axes_to_perm.items()},
                "fixed_reasons": dict(self.fixed_reasons)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PermutationSpec":
        def dec(e):
            return Blocked(tuple(e["shape"]), tuple(e["perms"])) if isinstance(e, dict) else e
        return cls({k: tuple(dec(e) for e in v) for k, v in d["axes_to_perm"].items()},
                   dict(d.get("fixed_reasons", {})))

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
        return git_rebasin_from_axes(self.axes_to_perm, **options) | {"fixed_reasons": dict(self.fixed_reasons)}


def check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                       sizes: Mapping[str, int]) -> None:
    """Every perm of the spec present, 1-D integer, of its group's size, and a true permutation."""
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
        if not _all_permutations(device, [perms[name] for name in names], [sizes[name] for name in names]):
            for name in names:
                _check_one_permutation(name, perms[name], sizes[name])


def _all_permutations(device: torch.device, ps: list[torch.Tensor], ns: list[int]) -> bool:
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


def _check_one_permutation(name: str, p: torch.Tensor, n: int) -> None:
    if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
        raise TypeError(f"perm {name!r} must be an integer tensor, got {p.dtype}")
    seen = torch.zeros(n, dtype=torch.bool, device=p.device)
    if n and (int(p.min()) < 0 or int(p.max()) >= n):
        raise ValueError(f"perm {name!r} has values outside [0, {n})")
    seen[p.long()] = True
    if not bool(seen.all()):
        dup = torch.bincount(p.long().cpu(), minlength=n).gt(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"perm {name!r} is not a permutation: duplicated indices {dup}")


def axis_index(entry: AxisEntry, perms: Mapping[str, torch.Tensor], size: int,
               device: torch.device | None = None) -> torch.Tensor | None:
    """The flat gather index of one axis (None when nothing permutes it)."""
    if entry is None:
        return None
    if isinstance(entry, str):
        return perms[entry].to(device=device, dtype=torch.long)
    if all(p is None for p in entry.perms):
        return None
    idx = torch.arange(size, device=device).reshape(entry.shape)
    for f, p in enumerate(entry.perms):
        if p is not None:
            idx = idx.index_select(f, perms[p].to(device=device, dtype=torch.long))
    return idx.reshape(-1)


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                      state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every permuted axis gathered: `new = old.index_select(axis, perm)`.

    The input is untouched; all tensors go through one fused `permute_multi` call per device.
    Fixed tensors are copied so the result never aliases the input.
    """
    sizes = spec.perm_sizes(state_dict)
    check_permutations(spec, perms, sizes)
    keys = list(state_dict)
    by_device: dict[torch.device, list[int]] = {}
    for i, k in enumerate(keys):
        by_device.setdefault(state_dict[k].device, []).append(i)
    out: dict[str, torch.Tensor] = {}
    for device, members in by_device.items():
        tensors, indices, owners, axes = [], [], [], []
        # One index tensor per distinct axis entry (a perm permutes many tensors): built once per call.
        index_of: dict[tuple[AxisEntry, int], torch.Tensor | None] = {}
        for j, i in enumerate(members):
            key = keys[i]
            t = state_dict[key]
            tensors.append(t.resolve_conj().resolve_neg())
            for axis, entry in enumerate(spec.axes_to_perm[key]):
                if entry is None:
                    continue
                size = t.shape[axis]
                idx = index_of.get((entry, size), False)
                if idx is False:
                    idx = index_of[entry, size] = axis_index(entry, perms, size, device)
                if idx is not None:
                    indices.append(idx)
                    owners.append(j)
                    axes.append(axis)
        results = ops.permute_multi(tensors, indices, owners, axes)
        for i, r in zip(members, results):
            out[keys[i]] = r
    return {k: out[k] for k in keys}


def identity_permutation(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> Perms:
    return {p: torch.arange(n) for p, n in spec.perm_sizes(state_dict).items()}


def random_permutation(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor],
                       generator: torch.Generator | int | None = None) -> Perms:
    """A uniformly random permutation of every perm group (seeded by a Generator or an int)."""
    if isinstance(generator, bool) or not (generator is None or isinstance(generator, (int, torch.Generator))):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    return {p: torch.randperm(n, generator=generator) for p, n in spec.perm_sizes(state_dict).items()}


def _checked(perms: Mapping[str, torch.Tensor], what: str) -> None:
    """Each value a true permutation of 0..n-1 (argsort of duplicates or of floats is no inverse)."""
    if not isinstance(perms, Mapping):
        raise TypeError(f"{what} must be a dict perm name -> LongTensor, got {type(perms).__name__}")
    for name, p in perms.items():
        if not isinstance(p, torch.Tensor) or p.dim() != 1:
            raise ValueError(f"{what}: perm {name!r} must be a 1-D integer tensor, got "
                             f"{type(p).__name__ if not isinstance(p, torch.Tensor) else list(p.shape)}")
        _check_one_permutation(name, p, p.numel())


def invert_permutation(perms: Mapping[str, torch.Tensor]) -> Perms:
    """π⁻¹ for every group: applying perms then their inverse is the identity. Each value must be a
    permutation of 0..n-1 (TypeError / ValueError naming the group otherwise)."""
    _checked(perms, "invert_permutation")
    return {k: torch.argsort(p) for k, p in perms.items()}


def compose_permutations(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> Perms:
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
