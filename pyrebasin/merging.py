"""N models into one basin: MergeMany (Git Re-Basin), whose permutations map every model into one shared
space (so the pairwise matchings they induce are cycle consistent), and the cycle-consistency error.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .matching import weight_matching
from .spec import (
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
)

__all__ = [
    "MergeResult",
    "cycle_consistency_error",
    "mean_state",
    "merge_many",
    "pairwise_from_shared",
    "pairwise_matchings",
]

State = Mapping[str, torch.Tensor]
Perms = dict[str, torch.Tensor]


@dataclass
class MergeResult:
    """`perms[i]` maps model i into the shared space (`apply_permutation(spec, perms[i], states[i])`;
    model 0's is the identity), `merged` the mean of the aligned models, `history` one record per sweep
    (how many models changed, the all-pairs objective Σ_{i<j} <θ_i, θ_j> after the sweep)."""

    perms: list[Perms]
    merged: dict[str, torch.Tensor]
    aligned: list[dict[str, torch.Tensor]]
    history: list[dict] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False

    def pairwise(self) -> dict[tuple[int, int], Perms]:
        """(i, j) -> the perms aligning model j to model i, for i < j, read off the shared space."""
        return pairwise_from_shared(self.perms)


def _check_states(spec: PermutationSpec, states: Sequence[State], name: str = "states") -> dict[str, int]:
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError(f"{name} must be a list of state dicts, got {type(states).__name__}")
    if len(states) < 2:
        raise ValueError(f"{name} needs at least 2 state dicts, got {len(states)}")
    sizes = spec.perm_sizes(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(states[0]):
            raise ValueError(f"{name}[{i}] has other keys than {name}[0]: {sorted(set(s) ^ set(states[0]))[:8]}")
        for k, v in s.items():
            if v.shape != states[0][k].shape or v.dtype != states[0][k].dtype:
                raise ValueError(f"{name}[{i}][{k!r}] is {v.dtype} {list(v.shape)} but {name}[0][{k!r}] is "
                                 f"{states[0][k].dtype} {list(states[0][k].shape)}")
    return sizes


def mean_state(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the floating-point tensors; other tensors (step counters) come from
    the first state."""
    first = states[0]
    return {k: (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone())
            for k, v in first.items()}


def _all_pairs_objective(states: Sequence[State]) -> float:
    # Σ_{i<j} <θ_i, θ_j> = ½(‖Σ θ_i‖² − Σ ‖θ_i‖²): the quantity MergeMany's sweeps increase
    total, squares = 0.0, 0.0
    for k, v in states[0].items():
        if not v.is_floating_point():
            continue
        stack = torch.stack([s[k] for s in states]).double()
        total += float(stack.sum(0).pow(2).sum())
        squares += float(stack.pow(2).sum())
    return 0.5 * (total - squares)


def _is_identity(perms: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.equal(p.long().cpu(), torch.arange(len(p)))) for p in perms.values())


def merge_many(spec: PermutationSpec, states: Sequence[State], *, max_iter: int = 100, seed: int = 0,
               init: str | Sequence[Mapping[str, torch.Tensor]] = "reference", progress: bool = False,
               matching: Mapping | None = None) -> MergeResult:
    """Git Re-Basin's MergeMany: in random order, match each model to the mean of the others (weight
    matching) and permute it, until a full sweep changes no permutation (or `max_iter` sweeps).

    Each step is block coordinate ascent on the all-pairs objective Σ_{i<j} <π_i θ_i, π_j θ_j> (the
    objective of C2M3's universe matching), so the permutations map all models into one shared space
    and every pairwise map π_j ∘ π_i⁻¹ is cycle consistent by construction. Finally everything is
    re-expressed in model 0's units (its perm is the identity).

    init: "reference" first matches every model to model 0 (a warm start that removes most of the
    planted symmetry at the cost of N−1 pairwise matchings), "identity" starts from the raw models as
    in the paper, or a list of one perms dict per model. `matching`: keyword options for every
    `weight_matching` call (e.g. {"max_iter": 50}). Inputs are never modified.
    """
    _check_states(spec, states)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    opts = dict(matching or {})
    bad = [k for k in ("seed", "init") if k in opts]
    if bad:
        raise ValueError(f"matching options {bad} are set by merge_many itself (pass seed= to merge_many)")
    n = len(states)
    if isinstance(init, str):
        if init not in ("reference", "identity"):
            raise ValueError(f"init={init!r}; expected 'reference', 'identity' or a list of perms")
        perms = [identity_permutation(spec, states[0]) for _ in range(n)]
        if init == "reference":
            for i in range(1, n):
                perms[i] = weight_matching(spec, states[0], states[i], seed=seed + i, **opts).perms
    else:
        perms = [dict(p) for p in init]
        if len(perms) != n:
            raise ValueError(f"init has {len(perms)} perms dicts but there are {n} states")
    aligned = [apply_permutation(spec, p, s) for p, s in zip(perms, states)]
    gen = torch.Generator().manual_seed(seed)
    history, converged, sweep = [], False, 0
    with tqdm(total=max_iter, desc="merge_many", disable=not progress, leave=False) as bar:
        for sweep in range(1, max_iter + 1):
            changed = 0
            for i in torch.randperm(n, generator=gen).tolist():
                others = mean_state([s for j, s in enumerate(aligned) if j != i])
                step = weight_matching(spec, others, aligned[i], seed=seed + sweep * n + i, **opts).perms
                if not _is_identity(step):
                    aligned[i] = apply_permutation(spec, step, aligned[i])
                    perms[i] = compose_permutations(perms[i], step)
                    changed += 1
            history.append({"sweep": sweep, "changed": changed, "objective": _all_pairs_objective(aligned)})
            bar.update(1)
            if changed == 0:
                converged = True
                break
    # the shared space is defined up to one global permutation: fix it to model 0's units
    gauge = invert_permutation(perms[0])
    perms = [compose_permutations(p, gauge) for p in perms]
    aligned = [apply_permutation(spec, p, s) for p, s in zip(perms, states)]
    return MergeResult(perms, mean_state(aligned), aligned, history, sweep, converged)


def pairwise_from_shared(perms: Sequence[Mapping[str, torch.Tensor]]) -> dict[tuple[int, int], Perms]:
    """Given perms[i] mapping model i into a shared space, the perms aligning model j to model i
    (i < j): π_ij = π_j ∘ π_i⁻¹, i.e. `apply_permutation(spec, out[i, j], states[j])` ≈ states[i]."""
    inv = [invert_permutation(p) for p in perms]
    return {(i, j): compose_permutations(dict(perms[j]), inv[i])
            for i, j in itertools.combinations(range(len(perms)), 2)}


def pairwise_matchings(spec: PermutationSpec, states: Sequence[State], *, seed: int = 0,
                       **options) -> dict[tuple[int, int], Perms]:
    """Two-model weight matching of every pair: (i, j) -> perms aligning model j to model i (i < j);
    `options` go to `weight_matching`. The baseline whose cycle-consistency error merging removes."""
    _check_states(spec, states)
    return {(i, j): weight_matching(spec, states[i], states[j], seed=seed, **options).perms
            for i, j in itertools.combinations(range(len(states)), 2)}


def cycle_consistency_error(pairwise: Mapping[tuple[int, int], Mapping[str, torch.Tensor]]) -> float:
    """The fraction of units, over every triple i < j < k and every perm group, where π_ik (model k to
    i) differs from going through j: π_jk then π_ij (= compose_permutations(π_jk, π_ij)). 0 when the
    matchings come from one shared space; `pairwise` maps (i, j), i < j, to the perms aligning j to i."""
    if not isinstance(pairwise, Mapping):
        raise TypeError(f"pairwise must map (i, j) pairs to perms dicts, got {type(pairwise).__name__}")
    models = sorted({m for pair in pairwise for m in pair})
    for i, j in itertools.combinations(models, 2):
        if (i, j) not in pairwise:
            raise ValueError(f"pairwise lacks the pair {(i, j)} (keys must be (i, j) with i < j for every pair)")
    wrong, total = 0, 0
    for i, j, k in itertools.combinations(models, 3):
        through = compose_permutations(dict(pairwise[j, k]), dict(pairwise[i, j]))
        for name, direct in pairwise[i, k].items():
            wrong += int((direct.long().cpu() != through[name].long().cpu()).sum())
            total += direct.numel()
    if total == 0:
        raise ValueError(f"cycle_consistency_error needs at least 3 models, got {len(models)}")
    return wrong / total
