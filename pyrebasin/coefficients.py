"""Replayable coefficient samplers for mode combinability: distributions of λ, the per-granularity index
map of a state dict (which λ each element uses), and lazy samples λ(seed, sample, index) never stored.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import rng
from .spec import Blocked, PermutationSpec

__all__ = ["Distribution", "CoefficientLayout", "Coefficients", "GRANULARITIES", "SPEC_GRANULARITIES",
           "coefficient_layout",
           "sample_coefficients", "check_seed"]

GRANULARITIES = ("element", "neuron", "layer", "global")
SPEC_GRANULARITIES = GRANULARITIES + ("head",)   # "head": attention heads (Blocked axes) of a spec, else layers
State = Mapping[str, torch.Tensor]
SEED_LIMIT = 1 << 63   # seeds travel as int64 into the native op: both backends refuse the same range


def check_seed(seed, name: str = "seed") -> int:
    """An int seed in [0, 2^63) (floats and bools refused, not truncated)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name}={seed} outside [0, 2^63)")
    return int(seed)


@dataclass(frozen=True)
class Distribution:
    """A coefficient distribution: constant(t), uniform(low, high), bernoulli(p),
    gaussian(mean, std[, clip_low, clip_high]) or beta(alpha, beta).

    `Distribution.parse("uniform(-0.5, 1.5)")`; a bare name takes the defaults (uniform(0, 1),
    bernoulli(0.5), gaussian(0.5, 0.25) unclipped, beta(0.5, 0.5), constant(0.5)); "gaussian(m, s, clip)"
    clips to [0, 1].
    """

    name: str
    params: tuple[float, ...]

    _DEFAULTS = {"uniform": (0.0, 1.0), "bernoulli": (0.5,), "gaussian": (0.5, 0.25), "beta": (0.5, 0.5),
                 "constant": (0.5,)}

    def __post_init__(self):
        if self.name not in rng.DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.name!r}; expected one of {sorted(rng.DISTRIBUTIONS)}")
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in self.params):
            raise TypeError(f"{self.name} parameters must be numbers, got {list(self.params)!r}")
        p = tuple(float(v) for v in self.params)
        if self.name == "gaussian" and len(p) == 2:
            p = p + (-math.inf, math.inf)
        object.__setattr__(self, "params", p)
        want = rng.DISTRIBUTIONS[self.name][1]
        if len(p) != want:
            raise ValueError(f"{self.name} takes {want} parameters, got {list(p)}")
        # only gaussian's clip bounds may be infinite (unclipped); NaN nowhere
        finite = p[:2] if self.name == "gaussian" else p
        if any(not math.isfinite(v) for v in finite) or any(math.isnan(v) for v in p):
            raise ValueError(f"{self.name} parameters must be finite (gaussian clip bounds may be ±inf), got {list(p)}")
        if self.name == "uniform" and not p[0] <= p[1]:
            raise ValueError(f"uniform(low, high) needs low <= high, got {p}")
        if self.name == "bernoulli" and not 0.0 <= p[0] <= 1.0:
            raise ValueError(f"bernoulli(p) needs 0 <= p <= 1, got {p[0]}")
        if self.name == "gaussian" and not (p[1] >= 0 and p[2] <= p[3]):
            raise ValueError(f"gaussian(mean, std, clip_low, clip_high) needs std >= 0, low <= high, got {p}")
        if self.name == "beta" and not (0 < p[0] < math.inf and 0 < p[1] < math.inf):
            raise ValueError(f"beta(alpha, beta) needs finite alpha, beta > 0, got {p}")

    @classmethod
    def parse(cls, spec: "str | float | Distribution") -> "Distribution":
        if isinstance(spec, Distribution):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls("constant", (float(spec),))
        if not isinstance(spec, str):
            raise TypeError(f"distribution must be a Distribution, a string or a float, got {type(spec).__name__}")
        m = re.fullmatch(r"\s*([a-z]+)\s*(?:\((.*)\))?\s*", str(spec))
        if not m:
            raise ValueError(f"cannot parse distribution {spec!r}; e.g. 'uniform(-0.5, 1.5)', 'bernoulli(0.5)'")
        name, inner = m.group(1), (m.group(2) or "").strip()
        if name not in cls._DEFAULTS:
            raise ValueError(f"unknown distribution {name!r} in {spec!r}; expected one of {sorted(cls._DEFAULTS)}")
        if not inner:
            return cls(name, cls._DEFAULTS[name])
        args = [a.strip() for a in inner.split(",")]
        if any(not a for a in args):
            raise ValueError(f"cannot parse distribution {spec!r}: an empty parameter (check the commas)")
        if name == "gaussian" and args[-1] == "clip":
            args = args[:-1] + ["0", "1"]
        try:
            return cls(name, tuple(float(a) for a in args))
        except ValueError as exc:
            raise ValueError(f"bad distribution {spec!r}: {exc}") from None

    def __str__(self) -> str:
        p = self.params
        if self.name == "gaussian" and p[2:] == (-math.inf, math.inf):
            p = p[:2]
        return f"{self.name}({', '.join(f'{v:g}' for v in p)})"


@dataclass(frozen=True)
class CoefficientLayout:
    """Which coefficient each element uses: element e (row-major) of `keys[i]` takes index
    `base[i] + (e // div[i]) % mod[i]`. Only floating-point tensors are combined."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    base: tuple[int, ...]
    div: tuple[int, ...]
    mod: tuple[int, ...]
    num_coefficients: int
    granularity: str

    def index(self, i: int) -> torch.Tensor:
        """Coefficient index of every element of tensor i, shaped like it."""
        e = torch.arange(math.prod(self.shapes[i]))
        return (self.base[i] + (e // self.div[i]) % self.mod[i]).reshape(self.shapes[i])


def _neuron_axis(key: str, shape: tuple[int, ...], spec: PermutationSpec,
                 blocked_only: bool = False) -> tuple[str, int, int] | None:
    """(perm, div, units) of an element's neuron: the unit along its FIRST permuted axis (its first
    Blocked one with `blocked_only`: the head of a (heads, head_dim) axis)."""
    for axis, entry in enumerate(spec.axes_to_perm[key]):
        inner = math.prod(shape[axis + 1:])
        if isinstance(entry, str) and not blocked_only:
            return entry, inner, shape[axis]
        if isinstance(entry, Blocked):
            for f, p in enumerate(entry.perms):
                if p is not None:
                    return p, inner * math.prod(entry.shape[f + 1:]), entry.shape[f]
    return None


def coefficient_layout(state: State, granularity: str = "element", spec: PermutationSpec | None = None
                       ) -> CoefficientLayout:
    """The coefficient index map of a state dict at a granularity.

    element: one λ per scalar (index = position in the concatenation of all floating tensors);
    neuron: one λ per unit of a perm group, shared by every element whose first permuted axis lies in
    that unit (weight rows of the layer the unit belongs to; the next layer's input columns are owned
    by that layer's own output units, the head's columns by the last hidden units), biases, norm
    params and BN buffers — tensors no perm touches (e.g. the head bias) get one λ each; needs `spec`;
    layer: one λ per module (the key up to its last '.'); global: one λ for everything; head (needs
    `spec`): one λ per attention head — the first permuted factor of a tensor's first Blocked axis
    (heads x head_dim of q/k/v/o) — and one λ per module for every other tensor.
    """
    if granularity not in SPEC_GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; expected one of {SPEC_GRANULARITIES}")
    keys = [k for k, v in state.items() if v.is_floating_point()]
    shapes = [tuple(state[k].shape) for k in keys]
    base, div, mod = [], [], []
    offsets, total = {}, 0          # neuron: perm groups first, then one index per untouched tensor
    if granularity in ("neuron", "head"):
        if spec is None:
            raise ValueError(f"granularity={granularity!r} needs a PermutationSpec (pass the spec, and the state)")
        sizes = spec.perm_sizes(state)
        used = spec.perm_names if granularity == "neuron" else dict.fromkeys(
            f[0] for f in (_neuron_axis(k, tuple(state[k].shape), spec, True) for k in keys) if f is not None)
        for p in used:
            offsets[p], total = total, total + sizes[p]
    modules: dict[str, int] = {}
    for key, shape in zip(keys, shapes):
        numel = max(1, math.prod(shape))
        if granularity == "element":
            b, d, m = total, 1, numel
            total += math.prod(shape)
        elif granularity == "global":
            b, d, m, total = 0, numel, 1, 1
        elif granularity == "layer":
            b = modules.setdefault(key.rpartition(".")[0], len(modules))
            d, m, total = numel, 1, len(modules)
        elif granularity == "head" and _neuron_axis(key, shape, spec, blocked_only=True) is None:
            if key.rpartition(".")[0] not in modules:
                modules[key.rpartition(".")[0]] = total
                total += 1
            b, d, m = modules[key.rpartition(".")[0]], numel, 1
        elif granularity == "head":
            p, d, m = _neuron_axis(key, shape, spec, blocked_only=True)
            b, d = offsets[p], max(1, d)
        else:
            found = _neuron_axis(key, shape, spec)
            if found is None:
                b, d, m = total, numel, 1
                total += 1
            else:
                p, d, m = found
                b, d = offsets[p], max(1, d)
        base.append(b)
        div.append(d)
        mod.append(m)
    return CoefficientLayout(tuple(keys), tuple(shapes), tuple(base), tuple(div), tuple(mod), total, granularity)


@dataclass(frozen=True)
class Coefficients:
    """n replayable coefficient samples: sample k's λ is a pure function of (seed, sample_begin + k),
    drawn in-kernel by `combine_states` / `evaluate_combinations` and never stored."""

    layout: CoefficientLayout
    distribution: Distribution
    seed: int
    n: int
    sample_begin: int = 0

    def __post_init__(self):
        check_seed(self.seed)
        for name in ("n", "sample_begin"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.sample_begin + self.n > 2**32:
            raise ValueError(f"samples [{self.sample_begin}, {self.sample_begin + self.n}) must lie in [0, 2^32)")

    def __len__(self) -> int:
        return self.n

    def constant(self) -> float | None:
        """λ when it is one constant for every sample and element (a `constant(c)` distribution), else None."""
        return self.distribution.params[0] if self.distribution.name == "constant" else None

    def sample_range(self, begin: int, end: int | None) -> torch.Tensor:
        end = self.n if end is None else end
        if not 0 <= begin <= end <= self.n:
            raise ValueError(f"sample range [{begin}, {end}) outside [0, {self.n})")
        return torch.arange(self.sample_begin + begin, self.sample_begin + end, dtype=torch.int64)

    def values(self, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """λ as a float64 tensor [K, num_coefficients] (materialised: for inspection and tests)."""
        s = self.sample_range(begin, end)
        idx = torch.arange(self.layout.num_coefficients, dtype=torch.int64)
        d = self.distribution
        return rng.coefficients(d.name, d.params, self.seed, s[:, None], idx[None, :])

    def per_tensor(self, begin: int = 0, end: int | None = None) -> dict[str, torch.Tensor]:
        """λ expanded to every element: key -> float64 [K, *shape]."""
        v = self.values(begin, end)
        return {k: v[:, self.layout.index(i).reshape(-1)].reshape(len(v), *self.layout.shapes[i])
                for i, k in enumerate(self.layout.keys)}

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        """Regenerate sample k alone: key -> λ shaped like the tensor."""
        return {key: v[0] for key, v in self.per_tensor(k, k + 1).items()}

    def describe(self) -> dict:
        return {"distribution": str(self.distribution), "granularity": self.layout.granularity,
                "seed": self.seed, "n": self.n, "sample_begin": self.sample_begin,
                "num_coefficients": self.layout.num_coefficients}


def sample_coefficients(spec_or_state: PermutationSpec | State, n: int, distribution="uniform",
                        granularity: str = "element", seed: int = 0, *, state: State | None = None,
                        sample_begin: int = 0) -> Coefficients:
    """n coefficient samples over a state dict's tensors (lazy and replayable).

    `spec_or_state`: a state dict (shapes), or a PermutationSpec together with `state=` (needed for
    granularity="neuron"). `distribution`: a `Distribution`, a string such as "uniform(-0.5, 1.5)",
    "bernoulli(0.5)", "beta(2, 2)", "gaussian(0.5, 0.2, clip)", or a float t (constant: LMC).
    """
    if isinstance(spec_or_state, PermutationSpec):
        spec = spec_or_state
        if state is None:
            raise ValueError("sample_coefficients(spec, ...) needs state= (a state dict giving the shapes)")
    else:
        spec, state = None, spec_or_state
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    check_seed(seed)
    dist = Distribution.parse(distribution)
    layout = coefficient_layout(state, granularity, spec)
    return Coefficients(layout, dist, seed, n, sample_begin)


