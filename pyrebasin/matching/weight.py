"""Weight matching (Git Re-Basin, Ainsworth et al. 2023, Algorithm 1): coordinate descent over perm
groups, each step one LAP on the group's cost Σ W_A·W̃_Bᵀ, B's other permutations applied.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..distributed import broadcast_optional, check_same
from ..spec import PermutationSpec, check_permutations
from .certify import Certificate
from .costs import WeightCosts
from .lap import LapPolicy
from .perturb import perturb_permutation
from .select import DATA_RESTARTS, MidpointScore

__all__ = ["MatchResult", "weight_matching", "METHODS", "COUPLING_SCHEDULE"]

COUPLING_SCHEDULE = (0.2, 1.0)

# Named matchers: the coupling weight of each phase, the refinement passes after them, how many group
# orders (seeds) are tried, the best final objective kept, and `settle`: a phase before the last stops
# once a sweep changed the true objective by at most that share of it (0: only when no LAP gains).
# "textbook" is Git Re-Basin's loop; "default" was chosen by the matcher study (docs/alignment.md,
# benchmarks/matchers.py); "thorough" buys a higher objective with 4 restarts (about 4x the default's time).
METHODS = {
    "textbook": dict(schedule=(1.0,), restarts=1, refine=0, settle=0.0),
    "schedule": dict(schedule=COUPLING_SCHEDULE, restarts=1, refine=0, settle=0.0),
    "default": dict(schedule=COUPLING_SCHEDULE, restarts=1, refine=2, settle=1e-3),
    "thorough": dict(schedule=COUPLING_SCHEDULE, restarts=4, refine=2, settle=1e-3),
}
KICK = 0.1  # share of a group's units that a refinement visit shuffles
# The default tries more group orders on small problems, where another basin is cheap to look for:
# SMALL_RESTARTS holds (at most this many permuted elements, orders), first match wins: 4 orders up to
# 2^16 elements (mnist1d MLP 40-128x3, VGG), 2 up to 2^18 (MLP 40-256x3, ResNet20 x1, the transformer),
# 1 above (docs/matchers.md: the MLP 40-128x3 runs within 0.5% of the best known 5/9 -> 8/9 with 4 orders).
SMALL_RESTARTS = ((1 << 16, 4), (1 << 18, 2))
# Above LARGE_SIZE permuted elements (MLP 784-2048x3: 10 M) the refinement's budget is LARGE_BUDGET x the
# schedule's LAP solves instead of REFINE_BUDGET: each LAP and cost update costs ~n^3 there, and the
# refinement's extra objective is small (784-2048x3: 174.37 vs 174.86; docs/matchers.md).
LARGE_BUDGET, LARGE_SIZE = 0.5, 1 << 23
REFINE_BUDGET = 1.0  # refinement stops once it has solved as many LAPs as the schedule did (or after its passes)
UNCERTIFIED = frozenset({"textbook"})  # methods that run to their own stop by default (Git Re-Basin's loop as published)


@dataclass
class MatchResult:
    """Permutations to apply to model B (`apply_permutation(spec, result.perms, state_b)` aligns B
    to A), the true objective after each sweep (initial value first), the number of sweeps run, and
    the sweep at which each phase of the coupling schedule started (the last phase, coupling 1, is
    plain coordinate descent on the true objective: monotone from `phase_starts[-1]` on; each kept
    refinement adds its final objective, so `iterations` may exceed `len(objective) - 1`). With
    restarts, the history is that of the kept run and `seed` the group-order seed it used.
    `certified`: the objective reached the Cauchy–Schwarz bound Σ_k ‖A_k‖·‖B_k‖ (`bound`, see
    matching/certify.py), so no permutation scores higher and the search stopped there (the phases
    not run then start, and end, at that sweep). `stage`, for a spec with nested perms: what ended the
    search ("shared", "families" or "descent" for the staged solve, matching/staged.py; "joint").
    `scores`, for a data-aware choice (`model=`, `data=`): the seed of each run tied with the best
    objective (within `select.TIE`) -> its midpoint loss on the data (the kept run has the lowest; a
    certified run stops the search unscored)."""

    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)
    iterations: int = 0
    phase_starts: list[int] = field(default_factory=list)
    seed: int = 0
    certified: bool = False
    bound: float | None = None
    stage: str | None = None
    scores: dict[int, float] | None = None


def _step(costs: WeightCosts, lap: LapPolicy, p: str, coupling: float, tol: float) -> torch.Tensor | None:
    """Group `p`'s LAP optimum when it gains more than `tol` over its current perm, else None. Under a
    process group the rank owning `p` builds the cost and solves; the others receive the outcome."""
    new = None
    if costs.owns(p):
        cost = costs.cost(p, coupling).to("cpu")
        cand, rows = lap.solve(p, cost), torch.arange(costs.sizes[p])
        if float(cost[rows, cand].sum() - cost[rows, costs.perms[p].cpu()].sum()) > tol:
            new = cand
    else:
        lap.solves += 1  # the refinement budget counts every solve, wherever it ran
    return broadcast_optional(new, costs.sizes[p], costs.owner[p], costs.group)


def _descend(costs: WeightCosts, lap: LapPolicy, gen: torch.Generator, coupling: float, max_iter: int,
             tol: float, history: list[float], bar, capped: list, *, every_sweep: bool = True,
             settle: float = 0.0, certify=None) -> int:
    """Algorithm 1 on `costs.cost(p, coupling)`: sweeps over the groups in a random order, each group
    takes the LAP optimum of its cost when it gains more than `tol`; stops after a sweep without a
    gain (or, with `settle` > 0, after a sweep that changed the true objective by at most `settle` x
    its size). Appends the true objective after each sweep (or, without `every_sweep`, only after the
    last) to `history`, and (coupling, last change of the objective) to `capped` when it stopped at
    `max_iter` still improving; returns the sweeps run. `certify(objective)`: stop once it is True."""
    names = list(costs.sizes)
    solved_at = dict.fromkeys(names)
    for sweep in range(1, max_iter + 1):
        improved = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            p = names[i]
            if solved_at[p] == costs.snapshot(p):
                continue  # nothing its cost reads changed: the LAP would return the same optimum
            solved_at[p] = costs.snapshot(p)
            new = _step(costs, lap, p, coupling, tol)
            if new is not None:
                costs.set_perm(p, new)
                improved = True
        bar.update()
        if every_sweep or not improved:
            history.append(costs.objective())
            bar.set_postfix(coupling=coupling, objective=f"{history[-1]:.6g}")
        certified = every_sweep and certify is not None and certify(history[-1])  # converged sweeps too
        if not improved or certified:
            return sweep
        if settle and every_sweep and abs(history[-1] - history[-2]) <= settle * abs(history[-1]):
            return sweep  # a phase that leads into another has settled: its tail barely moves the true objective
    if not every_sweep:
        history.append(costs.objective())
    if max_iter:  # every sweep improved, the last one too (a refinement's start value may be computed lazily)
        capped.append((coupling, history[-1] - (history[-2]() if callable(history[-2]) else history[-2])))
    return max_iter


def _refine(costs: WeightCosts, lap: LapPolicy, gen: torch.Generator, passes: int, max_iter: int, tol: float,
            history: list[float], bar, capped: list, budget_share: float | None = None) -> int:
    """Iterated local search after the descent: each pass visits the groups in a random order; a
    visit shuffles a share `KICK` of that group's units, descends on the true objective, and keeps
    the result only when it ends higher (then its final objective joins `history`). No visit starts
    once the refinement has solved `budget_share` (default `REFINE_BUDGET`) x the LAPs of the descent
    before it (a deterministic bound on its cost; 1x was chosen in docs/matchers.md). Returns the sweeps run."""
    sweeps, names = 0, list(costs.sizes)
    start, budget = lap.solves, (REFINE_BUDGET if budget_share is None else budget_share) * lap.solves
    for _ in range(passes):
        for i in torch.randperm(len(names), generator=gen).tolist():
            if lap.solves - start >= budget:
                return sweeps
            p = names[i]
            kept = {q: v.clone() for q, v in costs.perms.items()}
            costs.set_perm(p, perturb_permutation({p: kept[p].cpu()}, KICK, seed=gen)[p])
            kicked = {**kept, p: costs.perms[p]}  # its objective is read only by a capped descent's warning:
            trial = [lambda: costs.objective(kicked)]  # computed then (the same number), not at every visit
            sweeps += _descend(costs, lap, gen, 1.0, max_iter, tol, trial, bar, capped, every_sweep=False)
            if trial[-1] > history[-1] + tol * max(1.0, abs(history[-1])):
                history.append(trial[-1])
            else:
                for q, v in kept.items():
                    if not torch.equal(costs.perms[q], v):
                        costs.set_perm(q, v)
    return sweeps


def _selector(model, data, spec, provider) -> MidpointScore | None:
    """The data-aware choice's scorer, or None without `data`; clear errors for half-given or unsupported uses."""
    if data is None and model is None:
        return None
    if data is None or model is None:
        raise ValueError("weight_matching: model and data go together (the midpoint is evaluated on data); got only "
                         + ("model" if data is None else "data"))
    if getattr(spec, "nested", None) or provider is not None:
        raise ValueError("weight_matching: data-aware choice (model=, data=) needs in-memory states and a spec "
                         "without nested perms")
    return MidpointScore(model, data)


def _certified(bar, cert: Certificate, sweeps: int) -> None:
    bar.set_postfix(certified=True, objective=f"{cert.exact:.9g}", bound=f"{cert.bound:.9g}")
    if not bar.disable:
        bar.write(f"weight matching: certified optimal after {sweeps} sweep(s): objective {cert.exact:.9g} reaches "
                  f"the Cauchy-Schwarz bound {cert.bound:.9g} (rtol {cert.rtol:g})")


def _permuted_size(costs: WeightCosts, state_b) -> int:
    meta = costs.describe(state_b, costs.spec)
    return sum(math.prod(meta[k].shape) for k in costs.keys)


def _small_restarts(method: str, restarts, size: int) -> int | None:
    """The group orders `SMALL_RESTARTS` gives the default method on a problem of `size` permuted elements
    when `restarts` was not given, else None (the method's own count stands)."""
    if restarts is not None or method != "default":
        return None
    return next((n for limit, n in SMALL_RESTARTS if size <= limit), None)


def _refine_budget(size: int) -> float:
    """The refinement's budget, as a multiple of the schedule's LAP solves, for `size` permuted elements."""
    return LARGE_BUDGET if size > LARGE_SIZE else REFINE_BUDGET


def _check_options(method, schedule, restarts, refine, max_iter, seed):
    if method not in METHODS:
        raise ValueError(f"weight_matching: method={method!r}; expected one of {sorted(METHODS)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        raise ValueError(f"weight_matching: max_iter={max_iter!r} must be an int >= 0")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"weight_matching: seed={seed!r} must be an int")
    schedule = METHODS[method]["schedule"] if schedule is None else schedule
    restarts = METHODS[method]["restarts"] if restarts is None else restarts
    refine = METHODS[method]["refine"] if refine is None else refine
    try:
        schedule = tuple(float(w) for w in schedule)
    except (TypeError, ValueError):
        raise ValueError(f"weight_matching: schedule={schedule!r} must be a sequence of weights") from None
    if not schedule or schedule[-1] != 1.0 or any(not (math.isfinite(w) and 0.0 <= w <= 1.0) for w in schedule):
        raise ValueError(f"weight_matching: schedule={schedule} must hold weights in [0, 1] and end with 1.0")
    if isinstance(restarts, bool) or not isinstance(restarts, numbers.Integral) or restarts < 1:
        raise ValueError(f"weight_matching: restarts={restarts!r} must be an int >= 1")
    if isinstance(refine, bool) or not isinstance(refine, numbers.Integral) or refine < 0:
        raise ValueError(f"weight_matching: refine={refine!r} must be an int >= 0")
    return schedule, int(restarts), int(refine)


@torch.no_grad()
def weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor],
                    state_b: Mapping[str, torch.Tensor], *, method: str = "default", max_iter: int = 100,
                    seed: int = 0, init: Mapping[str, torch.Tensor] | None = None, solver: str | None = None,
                    progress: bool = False, tol: float = 1e-12, warm_start: bool = True,
                    schedule: Sequence[float] | None = None, restarts: int | None = None,
                    refine: int | None = None, group=None, provider=None, certify: bool | None = None,
                    nested: str = "staged", model: torch.nn.Module | None = None, data=None) -> MatchResult:
    """Permutations of B's units that maximise Σ <W_A, π(W_B)> (Git Re-Basin weight matching).

    `method`: a name in `METHODS` ("textbook" is the paper's loop, "default" the matcher chosen in
    docs/alignment.md, "thorough" the default with 4 restarts); `schedule`, `restarts` and `refine`
    override its parts. `schedule`: the weight of the coupling terms (those that read another perm,
    e.g. the next layer's columns) in each phase, ending with 1.0, each phase starting from the
    previous one's perms: early on B's other axes are unaligned and those terms are mostly noise.
    `refine`: passes of iterated local search after the schedule (each visit shuffles a share `KICK`
    of one group's units, re-descends, and keeps the result only if the objective rose).
    `restarts`: group-order seeds seed, seed+1, ... tried; the run with the best final objective is
    kept (the first on ties). The default tries more orders on small problems (`SMALL_RESTARTS`: 4 up
    to 2^16 permuted elements, 2 up to 2^18, 1 otherwise; docs/matchers.md).

    Each sweep visits the groups in a seeded random order and solves one LAP per group (cost on the
    tensors' device, LAP on the CPU, `solver` and `warm_start` as in `LapPolicy`); a group whose
    cost's inputs did not change since its last solve is skipped. A phase stops after a sweep
    without an improvement > `tol`, or after `max_iter` sweeps (with a RuntimeWarning when the
    last sweep still improved); a phase before the last also once it settled (the method's
    `settle`, see `METHODS`). Inputs are never modified.

    Under torch.distributed (`group`: None = the default group when initialised, a group, or False for
    this process alone) every rank passes the same arguments; each rank builds, caches and solves
    the cost of the groups it owns (balanced by GEMM work) and the objective's share of the tensors
    it owns, so cost memory is split; one broadcast per group visit shares the outcome. Problems whose
    float64 costs total less than `costs.SPLIT_MIN_BYTES` (64 MiB) run whole on every rank instead.
    Every rank returns the single-process result bit for bit (docs/distributed.md).

    `provider(spec, state_a, state_b, group=...)` builds the cost provider (default `WeightCosts`,
    holding float32 copies; `matching.streamed.StreamedCosts` reads lazy checkpoints block by block).
    A spec with nested perms (`nested`): "staged" (default, matching/staged.py) solves the shared-perm
    subgroup on this path first (with `provider`), then the nested families from there, then a nested
    descent unless certified; "shared" stops after the subgroup (its perms lifted); "joint" runs the
    family-by-family descent alone (`matching.nested_weight`, `provider` not used). docs/matching.md.

    `certify` (default: every method but "textbook"): stop the search as soon as the objective reaches
    the Cauchy–Schwarz bound Σ_k ‖A_k‖·‖B_k‖ (checked after each sweep of the schedule and at the start;
    `result.certified`, matching/certify.py): B is then A permuted (up to per-tensor scale) and no
    permutation can do better, so refinement and restarts are skipped. Never fires on a noisy pair.

    `model` and `data` (some of the training data: an (x, y) pair, batches, a DataLoader or token
    batches; one split): a data-aware tie-break between runs. `restarts` group orders (default
    `select.DATA_RESTARTS`) are run; of those whose objective is within `select.TIE` (relative) of the
    best one's, the kept run is the one whose midpoint ½·(θ_A + π(θ_B)) has the lowest loss on `data`
    (BatchNorm statistics recomputed there): near-optimal permutations tie on the objective but not on
    the barrier (docs/matchers.md). `result.scores` holds each scored run's midpoint loss. Under
    torch.distributed every rank must pass the same data.
    """
    restarts_arg = restarts
    schedule, restarts, refine = _check_options(method, schedule, restarts, refine, max_iter, seed)
    chooser = _selector(model, data, spec, provider)
    if chooser is not None and restarts_arg is None:
        restarts, restarts_arg = DATA_RESTARTS, DATA_RESTARTS
    if nested not in ("staged", "joint", "shared"):
        raise ValueError(f"weight_matching: nested={nested!r}; expected 'staged', 'joint' or 'shared'")
    if getattr(spec, "nested", None) and nested != "joint":  # the shared subgroup first (matching/staged.py)
        from .staged import staged_descent

        def stage1(plain, start):
            return weight_matching(plain, state_a, state_b, method=method, max_iter=max_iter, seed=seed, init=start,
                                   solver=solver, progress=progress, tol=tol, warm_start=warm_start, schedule=schedule,
                                   restarts=restarts, refine=0 if nested == "staged" else refine, group=group,
                                   provider=provider, certify=certify)   # staged: refinement in the full group (stage 3)
        return MatchResult(**staged_descent(spec, state_a, state_b, stage1, nested=nested, refine=refine, seed=seed,
                                            certify=method not in UNCERTIFIED if certify is None else bool(certify),
                                            max_iter=max_iter, init=init, solver=solver, progress=progress, tol=tol))
    if getattr(spec, "nested", None):  # nested perms: families solved jointly (matching/nested_weight.py)
        from .nested_weight import nested_descent
        perms, history, sweeps, s, _ = nested_descent(spec, state_a, state_b, schedule=schedule, restarts=restarts,
                                                      refine=refine, max_iter=max_iter, seed=seed, init=init,
                                                      solver=solver, progress=progress, tol=tol, group=group)
        return MatchResult(perms, history, sweeps, [0], s, stage="joint")
    costs = (provider or WeightCosts)(spec, state_a, state_b, group=group)
    size = _permuted_size(costs, state_b)
    restarts = _small_restarts(method, restarts_arg, size) or restarts
    if init is not None:
        check_permutations(spec, init, costs.sizes)
    check_same((costs.sizes, schedule, restarts, refine, max_iter, seed, tol, solver, warm_start,
                None if init is None else {p: v.tolist() for p, v in init.items()}), "weight_matching", costs.group)
    start = {p: (torch.arange(n) if init is None else init[p].detach().to("cpu", torch.long).clone())
             for p, n in costs.sizes.items()}
    bar = tqdm(total=max_iter * (len(schedule) + refine * len(costs.sizes)) * restarts, desc="weight matching",
               disable=not progress, leave=False)
    best, capped, runs = None, [], []
    cert = Certificate(costs) if (method not in UNCERTIFIED if certify is None else certify) else None
    for s in range(seed, seed + restarts):
        for p, v in start.items():
            costs.set_perm(p, v)
        lap, gen = LapPolicy(list(costs.sizes), solver=solver, warm_start=warm_start), torch.Generator().manual_seed(s)
        history, phase_starts, sweeps = [costs.objective()], [], 0
        done = cert is not None and cert(history[-1])
        for k, coupling in enumerate(schedule):
            phase_starts.append(sweeps)
            if not done:
                sweeps += _descend(costs, lap, gen, coupling, max_iter, tol, history, bar, capped, certify=cert,
                                   settle=METHODS[method]["settle"] if k < len(schedule) - 1 else 0.0)
                done = cert is not None and cert.certified
        if not done:
            sweeps += _refine(costs, lap, gen, refine, max_iter, tol, history, bar, capped, _refine_budget(size))
        run = None
        if chooser is not None or best is None or history[-1] > best.objective[-1]:
            perms = {p: v.to("cpu").clone() for p, v in costs.perms.items()}
            run = MatchResult(perms, history, sweeps, phase_starts, s, bool(done), None if cert is None else cert.bound)
        if best is None or history[-1] > best.objective[-1]:
            best = run
        if chooser is not None and not done:
            runs.append(run)
        if done:
            _certified(bar, cert, sweeps)
            break  # no restart can score higher
    bar.close()
    if chooser is not None:
        if not best.certified:  # a certified run is optimal: B is A permuted, nothing to choose
            best = chooser.choose(runs, spec, state_a, state_b)
        best.scores = dict(chooser.scores)
    if capped:
        coupling, change = capped[0]
        warnings.warn(f"weight_matching: {len(capped)} descent(s) stopped at max_iter={max_iter} sweeps while still "
                      f"improving (first: coupling {coupling}, its last sweep changed the objective by {change:+.3g}); "
                      "raise max_iter", RuntimeWarning, stacklevel=3)  # the caller of weight_matching
    return best
