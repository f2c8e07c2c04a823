"""Staged weight matching for specs with nested perms (docs/matching.md, "Staged solve").

The shared-perm spec (`spec.without_nesting`: one inner perm for every block of its outer perm) is a
subgroup of the nested group, and the Cauchy–Schwarz bound Σ_k ‖A_k‖·‖B_k‖ (matching/certify.py) holds
for every permutation, so a certificate in the subgroup is one in the full group. Hence:

1. the shared spec on the plain path (`WeightCosts` / `StreamedCosts`: rank-|S| updates, process
   groups, certificate, the method's schedule and restarts; its refinement is left to stage 3, where
   kicks act in the full group and a nested plant is not first refined in the subgroup); certified: lifted
   (`nested.lift_shared`) and returned, optimal in the full group (`stage="shared"`);
2. from the lifted perms, only the families with nested members (GQA KV heads with their query heads
   and value dims, experts with their hidden units) are visited: each reads only its own tensors (once
   per visit), and since every other perm is at its coordinate optimum from stage 1, nothing else
   moved. Then the true objective (one pass) and the certificate (`stage="families"`);
3. otherwise `nested_descent`'s coordinate descent at coupling 1 from there, to convergence, and the
   method's refinement with the budget of stage 1's schedule and this descent (`stage="descent"`): a coordinate-wise optimum of the full nested problem. A
   family whose inputs did not move since its last optimal visit (or, for plain perms, since stage 1
   converged) is not revisited, and objectives re-read only the tensors whose perms moved.

Every step of stages 2 and 3 is kept only when the true objective rises, so the result never scores
below stage 1's. Stages 2 and 3 run in one process (under a process group, on every rank alike).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from tqdm.auto import tqdm

from ..nested import lift_shared
from ..spec import PermutationSpec, check_permutations
from .certify import RTOL
from .costs import dot64
from .nested_weight import NestedCosts, Problem, descend, is_lazy, refine_families

__all__ = ["MODES", "staged_descent", "shared_part"]

MODES = ("staged", "joint", "shared")  # weight_matching's `nested`: this module, nested_descent alone, stage 1 only


def shared_part(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Nested perms projected to the shared subgroup: each nested P takes its first block's inner
    perm (exact for lifted perms), as a perm of `spec.without_nesting`."""
    out = {p: v.detach().to("cpu", torch.long).clone() for p, v in perms.items()}
    for p, q in spec.nested.items():
        k = perms[q].numel()
        out[p] = out[p].view(k, -1)[0] % (out[p].numel() // k)
    return out


def staged_descent(spec: PermutationSpec, state_a, state_b, stage1: Callable, *, nested: str = "staged",
                   certify: bool = True, refine: int = 0, max_iter: int = 100, seed: int = 0,
                   init: Mapping[str, torch.Tensor] | None = None, solver: str | None = None,
                   progress: bool = False, tol: float = 1e-12) -> dict:
    """The staged solve (module docstring). `stage1(plain_spec, init)` runs the plain weight matching
    (a `MatchResult`, `bound` set when certifying); `nested="shared"` stops after it. An `init`
    outside the shared subgroup skips stage 1 (stage 2 starts there; with "shared", it is projected,
    `shared_part`). Returns the fields of weight matching's `MatchResult`: the objective history of
    every stage (stage 1's, the value after stage 2, then each gain of stage 3), `certified`, and
    `stage` (which stage ended the search)."""
    meta = state_a.meta() if is_lazy(state_a) else state_a
    start, inside, sweeps1 = None, True, 0
    if init is not None:
        check_permutations(spec, init, spec.perm_sizes(meta))
        start = shared_part(spec, init)
        inside = all(torch.equal(v, init[p].to("cpu", torch.long)) for p, v in lift_shared(spec.nested, start).items())
    if inside or nested == "shared":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = stage1(spec.without_nesting(meta), start)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        converged = not any("max_iter" in str(w.message) for w in caught)
        sweeps1 = first.iterations
        perms = lift_shared(spec.nested, first.perms)
        out = dict(perms=perms, objective=list(first.objective), iterations=first.iterations,
                   phase_starts=list(first.phase_starts), seed=first.seed, certified=first.certified,
                   bound=first.bound, stage="shared")
        if first.certified or nested == "shared":
            return _report(out, progress)
    # no copy held; the cost cache as nested_descent's (StreamedCosts' 512 MiB for lazy checkpoints)
    costs = NestedCosts(spec, state_a, state_b, cache_bytes=(512 << 20) if is_lazy(state_a) else (1 << 30), hold=False)
    if not inside:   # the subgroup cannot start at init: stages 2 and 3 from there
        perms, converged = {p: v.detach().to("cpu", torch.long).clone() for p, v in init.items()}, False
        out = dict(perms=perms, objective=[costs.objective(perms)], iterations=0, phase_starts=[0], seed=seed,
                   certified=False, bound=_bound(costs) if certify else None, stage="families")
    prob = Problem(costs, spec, solver, tol)
    track = (dict.fromkeys(perms, 0), {})   # perm versions, family -> versions of its last visit without a gain
    gen = torch.Generator().manual_seed(out["seed"])
    out["iterations"] += descend(prob, perms, gen, 1.0, max_iter, None, only=set(spec.nested.values()), track=track)
    out["objective"].append(costs.objective(perms))
    out["stage"] = "families"
    if _certify(out):
        return _report(out, progress)
    if converged:   # plain perms are at their LAP optimum for stage 1's perms (versions 0)
        for q, kids in prob.fams:
            if not kids:
                track[1].setdefault(q, tuple(0 for _ in prob.deps[q]))
    bar = tqdm(total=max_iter, desc="weight matching (staged, nested descent)", disable=not progress, leave=False)
    before = prob.stats["visits"]
    out["iterations"] += descend(prob, perms, gen, 1.0, max_iter, bar, track=track)
    bar.close()
    # the refinement's budget: a share of the visits of this descent and of stage 1's schedule (whose own
    # refinement the staged solve moves here, into the full group: stage 1 runs without it)
    prob.stats["visits"] += sweeps1 * len(prob.fams) - before
    value = costs.objective(perms)
    if value > out["objective"][-1]:
        out["objective"].append(value)
    perms, sweeps = refine_families(prob, perms, out["objective"], gen, refine, max_iter, track)
    out.update(perms=perms, iterations=out["iterations"] + sweeps, stage="descent")
    _certify(out)
    return _report(out, progress)


def _bound(costs: NestedCosts) -> float:
    """Σ_k ‖A_k‖·‖B_k‖ over the permuted tensors (matching/certify.py), one read of each."""
    buffers = tuple(torch.empty(1 << 17, dtype=torch.float64) for _ in range(2))
    total = 0.0
    for k in costs.keys:
        a, b = (t.cpu() for t in costs.pair(k))
        total += (dot64(a, a, buffers) * dot64(b, b, buffers)) ** 0.5
    return total


def _certify(out: dict) -> bool:
    bound = out["bound"]
    out["certified"] = bound is not None and bound > 0 and out["objective"][-1] >= bound - RTOL * bound
    return out["certified"]


def _report(out: dict, progress: bool) -> dict:
    if progress:
        tqdm.write(f"weight matching (staged): ended in stage {out['stage']!r}, objective {out['objective'][-1]:.9g}"
                   + (f", certified (bound {out['bound']:.9g})" if out["certified"] else ""))
    return out
