"""Activation matching (Git Re-Basin): per permutation group, correlate the activations of A's and B's
units over data (streaming float64 moments, `CrossMoments`) and solve one LAP on the correlation.

Activation sites. A perm's units are read at the *input* of every Linear/Conv whose weight axis 1 it
permutes (its consumers): that input is the post-nonlinearity activation (after ReLU/GELU, pooling,
LayerNorm or the residual add), and one shared perm (a residual stream) accumulates all of its
consumers. A perm without consumers (the transformer's q/k dims) is read at the *output* of its
producers (weight axis 0). Conv positions and tokens count as samples. `Blocked` axes: factors
without a perm (the flattened positions of conv -> flatten -> linear) count as samples; two permuted
factors (heads x head_dim) are correlated jointly and solved by coordinate descent, the first factor
seen starting from a per-pair best match of the other. A perm with no Linear/Conv site is an error.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..batches import batches, check_batch_size
from ..distributed import all_reduce_moments_, broadcast_object, gather_objects, is_distributed
from ..module_state import check_finite_state, mode_view, model_state
from ..moments import ACCUMULATOR_DTYPES, CrossMoments
from ..spec import PermutationSpec
from ..lm import model_kwargs
from ..streamed_forward import streamed_weights
from .activation_stats import Site, find_sites, gather_moments, plan_passes, probe_sites
from .lap import solve_lap
from .nested_activation import family_descent
from .weight import MatchResult

__all__ = ["activation_matching", "find_sites", "Site"]


def _states(model: nn.Module, state, name: str, spec: PermutationSpec):
    """(full state for functional_call, state for the spec check): the model's own tensors by default
    (non-persistent buffers included, which a spec of state-dict keys does not declare). A model that
    streams its weights (`streamed_forward`) reads them itself: no state, its checkpoint's shapes."""
    streamed = streamed_weights(model)
    if streamed is not None:
        if state is not None:
            raise ValueError(f"activation_matching: {name} must be None for a model that streams its weights "
                             "from a checkpoint (stream_weights_)")
        return {}, streamed.meta()
    if state is None:
        full = model_state(model)
        persistent = set(model.state_dict(keep_vars=True))
        spec_view = {k: v for k, v in full.items() if k in persistent or k in spec.axes_to_perm}
    else:
        if not isinstance(state, Mapping):
            raise TypeError(f"activation_matching: {name} must be a mapping of str -> Tensor, "
                            f"got {type(state).__name__}")
        full = spec_view = dict(state)
    for k, v in full.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"activation_matching: {name}[{k!r}] is a {type(v).__name__}, not a Tensor")
        if v.is_meta:
            raise ValueError(f"activation_matching: {name}[{k!r}] is a meta tensor (no data); load real weights first")
    # NaN weights give NaN (or, through ReLU, silently zero) activations: a wrong match, never an error
    check_finite_state(full, f"activation_matching: {name}")
    return full, spec_view


def _agree(what, group, failure: str | None) -> None:
    """All ranks compare `what` (and their failures) before a collective: a bad shard or another
    structure on one rank is a ValueError on every rank, never a hang."""
    everyone = gather_objects((what, failure), group) if is_distributed(group) else [(what, failure)]
    failed = [(r, e[1]) for r, e in enumerate(everyone) if e[1] is not None]
    if failed:
        raise ValueError("; ".join(f"rank {r}: {msg}" for r, msg in failed))
    odd = [r for r, e in enumerate(everyone) if e[0] != everyone[0][0]]
    if odd:
        raise ValueError(f"activation_matching: rank(s) {odd} reached other activation sites (or widths) than "
                         "rank 0; every rank must run the same models on data of the same form")


def _reduce(moments, group_sites, n, group, failure: str | None = None) -> None:
    """Sum every rank's statistics of one pass in place (one all-reduce per site, so the flattened
    buffer is one site's size); float32 shifted sums are first moved to the ranks' mean shift."""
    everyone = gather_objects((n, failure), group) if is_distributed(group) else [(n, failure)]
    failed = [(r, e[1]) for r, e in enumerate(everyone) if e[1] is not None]
    if failed:
        raise ValueError("; ".join(f"rank {r}: {msg}" for r, msg in failed))
    empty = [r for r, e in enumerate(everyone) if e[0] == 0]
    if empty:
        where = f" on rank(s) {empty}" if len(everyone) > 1 else ""
        raise ValueError(f"activation_matching: `data` yielded no batches{where}")
    _agree([(i, tuple(moments[s].sum_xy.shape)) for i, s in enumerate(group_sites) if s in moments], group, None)
    if not is_distributed(group):
        return
    world = dist.get_world_size(group)
    for s in group_sites:
        if s not in moments:
            continue
        m = moments[s]
        if m.shifted:
            shifts = torch.cat([m.shift_x, m.shift_y])
            dist.all_reduce(shifts, op=dist.ReduceOp.SUM, group=group)
            shifts /= world
            m.reshift_(shifts[:m.sum_x.numel()], shifts[m.sum_x.numel():])
        all_reduce_moments_(m, group)


def _factor_cost(corr: torch.Tensor, site: Site, p: str, sizes, perms, solved) -> torch.Tensor:
    """Cost of perm p from one site's joint correlation: other permuted factors contracted along their
    current perm when solved, else reduced by their best per-pair match (max over B, sum over A)."""
    names = list(site.perms)
    if len(names) == 1:
        return corr
    dims = [sizes[q] for q in names]
    c = corr.reshape(dims + dims)
    m = len(names)
    i = names.index(p)
    order = [i] + [j for j in range(m) if j != i]
    c = c.permute(order + [m + j for j in order])  # [p, others..., p', others'...]
    others = [names[j] for j in order[1:]]
    k = len(others)
    for j, q in reversed(list(enumerate(others))):  # contract solved factors, last first
        if q in solved:
            a_dim, b_dim = 1 + j, 2 + k + j
            c = c.index_select(b_dim, perms[q].to(c.device))
            c = torch.diagonal(c, dim1=a_dim, dim2=b_dim).sum(-1)
            k -= 1
    # remaining (unsolved) factors: [p, u..., p', u'...] -> [p, U, p', U']
    n_p = sizes[p]
    c = c.reshape(n_p, -1, n_p, int(math.prod(c.shape[1:1 + k])))
    return c.amax(3).sum(1)


# A unit whose activation's std is below this fraction of its RMS is constant over the data (float32
# rounding of identical rows is ~1e-7 relative): its correlations are noise, so they count as 0.
_CONSTANT_RTOL = 1e-5
# Added to the identity's diagonal before each LAP: among (near-)optimal assignments the identity
# wins, so units that the statistics cannot tell apart stay in place (a model matched with itself
# is matched to the identity). Far below any correlation difference float32 activations resolve.
_IDENTITY_TIE = 1e-9


def _corr(m: CrossMoments, site: Site) -> tuple[torch.Tensor, int, int]:
    """The site's correlation, computed in place in its Σxyᵀ, with rows/columns of constant units
    zeroed, and the number of constant units of A and of B; an activation that overflowed is an
    error naming the module."""
    const_a = m.var_x <= _CONSTANT_RTOL**2 * m.mean_sq_x
    const_b = m.var_y <= _CONSTANT_RTOL**2 * m.mean_sq_y
    finite = bool(torch.isfinite(m.sum_xx).all() & torch.isfinite(m.sum_yy).all())
    c = m.corr_()
    if not finite or not math.isfinite(float(c.sum())):   # |corr| <= 1: only NaN/Inf make the sum non-finite
        raise ValueError(f"activation_matching: the activations at the {site.where}put of {site.module!r} are "
                         "not finite (an overflow or an invalid operation); check the data's scale and the weights")
    c[const_a] = 0.0
    c[:, const_b] = 0.0
    return c.cpu(), int(const_a.sum()), int(const_b.sum())


def _first_batch(data, batch_size):
    """(the first batch's inputs, data to read from the start): a one-shot iterator's first item is
    put back in front of it."""
    stream = data
    if isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, Mapping, tuple, list)) \
            and iter(data) is data:
        try:
            head = next(data)
        except StopIteration:
            raise ValueError("activation_matching: data yielded no batches") from None
        stream, data = itertools.chain([head], data), [head]
    x, _ = next(iter(batches(data, batch_size=batch_size, labels="ignored", name="activation_matching: data")))
    return x, stream


def _solve_alone(cost: torch.Tensor, solver) -> tuple[torch.Tensor, float, float]:
    """A perm of no coupled site: one LAP on its summed correlations (the identity tie added in
    place), with the objective at the identity and at the solution."""
    r = torch.arange(cost.shape[0])
    before = float(cost.diagonal().sum())
    cost.diagonal().add_(_IDENTITY_TIE)
    perm = solve_lap(cost, solver=solver)
    after = float(cost[r, perm].sum()) - _IDENTITY_TIE * int((perm == r).sum())
    return perm, before, after


@torch.no_grad()
def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data,
                        *, state_a: Mapping[str, torch.Tensor] | None = None,
                        state_b: Mapping[str, torch.Tensor] | None = None, batch_size: int = 512,
                        max_batches: int | None = None, max_iter: int = 100, solver: str | None = None,
                        dtype: torch.dtype = torch.float64, max_memory: int | None = None,
                        progress: bool = False, group=None) -> MatchResult:
    """Permutations of B's units maximising the summed correlation of A's and B's activations.

    `data`: any form `pyrebasin.batches.batches` reads — a tensor of inputs or an `(x, y)` pair (split
    into `batch_size` rows; labels unused), an iterable of batches or a DataLoader. Token batches: a
    LongTensor [B, T] of ids, or a dict with `input_ids` (and `attention_mask`, whose zeros — padding —
    are left out of the statistics), passed to the model as keyword arguments; a model whose forward
    takes `use_cache` (HF) gets `use_cache=False`. Non-finite inputs or weights are refused (ValueError
    naming them). Both models run in eval mode on private views (`mode_view`) through
    `torch.func.functional_call` on `state_a` / `state_b` (default: each model's own tensors,
    non-persistent buffers such as rotary `inv_freq` included), so neither model, its flags nor a state
    is modified. Units whose activation is constant over the data (dead units, a single sample,
    constant inputs) correlate with nothing; ties go to the identity, so a model matched with itself
    gets the identity; a group with no varying unit at all keeps the identity, with a warning.

    Memory: `dtype` is the moments' accumulator, float64 (default) or float32 (shifted sums, half the
    memory; docs/lm.md gives its measured accuracy). `max_memory` (bytes, None = unbounded) bounds the
    moments alive at once: the sites are split into passes over the data (the data must then be
    re-iterable), each perm solved as soon as its last site is read; the result is identical to one
    pass. Correlations are formed in place; a pass stops each forward once it has read its sites.

    Returns `MatchResult`: `objective` holds Σ of matched correlations (identity first, then after
    each sweep); `iterations` the sweeps (1 unless factors couple).

    Under torch.distributed (`group`: None = the default group when initialised, a group, or False for
    this process alone) each rank passes its own shard of the data (`max_batches` counts per rank): the
    statistics are summed over the ranks, and every rank returns rank 0's result, that of one process
    reading all shards (to accumulator rounding). Identical data on every rank gives the
    single-process result too (the correlations of repeated data are those of the data).
    """
    check_batch_size(batch_size)
    check_batch_size(max_batches, "max_batches", allow_none=True)
    check_batch_size(max_iter, "max_iter")
    check_batch_size(max_memory, "max_memory", allow_none=True)
    if dtype not in ACCUMULATOR_DTYPES:
        raise ValueError(f"activation_matching: dtype must be torch.float64 or torch.float32, got {dtype!r}")
    for name, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"activation_matching: {name} must be an nn.Module, got {type(m).__name__}")
    state_a, spec_a = _states(model_a, state_a, "state_a", spec)
    state_b, spec_b = _states(model_b, state_b, "state_b", spec)
    sizes = spec.perm_sizes(spec_a)
    sizes_b = spec.perm_sizes(spec_b)
    if sizes != sizes_b:
        raise ValueError(f"activation_matching: perm sizes differ between A {sizes} and B {sizes_b}")
    sites = find_sites(model_a, spec)
    # eval-mode views: BatchNorm must not update (or use batch) statistics, and the caller's flags stay
    view_a = mode_view(model_a)
    view_b = view_a if model_b is model_a else mode_view(model_b)
    run_a = (view_a, state_a, model_kwargs(model_a))
    run_b = (view_b, state_b, model_kwargs(model_b))
    device = next(iter(state_a.values())).device if state_a else torch.device("cpu")
    failure, stream = None, data
    try:   # the sites in forward order, and those that read another's tensor (q/k/v: counted once)
        first, stream = _first_batch(data, batch_size)
        first = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in first.items()} \
            if isinstance(first, Mapping) else first.to(device)
        order, shared, calls = probe_sites([run_a, run_b], sites, first)
    except ValueError as e:   # bad data on this rank: every rank must hear of it before the collective
        if not is_distributed(group):
            raise
        order, shared, calls, failure = list(sites), set(), {}, str(e)
    _agree(([sites.index(s) for s in order], sorted(sites.index(s) for s in shared)), group, failure)
    coupled = {p for p in sizes if any(len(s.perms) > 1 for s in order if p in s.perms)}
    coupled |= {p for pair in spec.nested.items() for p in pair}  # a family is solved as one unit
    kept = {s for s in order if coupled.intersection(s.perms)}
    passes = plan_passes(order, sizes, kept, max_memory, dtype)
    if len(passes) > 1 and stream is not data:
        raise TypeError(f"activation_matching: max_memory={max_memory} needs {len(passes)} passes over the data, "
                        f"but data is a one-shot iterator ({type(data).__name__}); pass a re-iterable (a list "
                        "of batches, a DataLoader) or tensors")
    left = {p: sum(p in s.perms for s in order) for p in sizes}   # sites still to read, per perm
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    corr, cost, varying, reached = {}, {}, {p: [0, 0] for p in sizes}, set()
    alone = {"before": 0.0, "after": 0.0}   # objective of the perms solved on their own
    samples = 0
    for k, group_sites in enumerate(passes):
        failure = None
        try:
            moments, n_batches = gather_moments(
                run_a, run_b, group_sites, calls, stream, batch_size=batch_size, max_batches=max_batches,
                dtype=dtype, device=device, progress=progress,
                desc=f"activation statistics{f' (pass {k + 1}/{len(passes)})' if len(passes) > 1 else ''}")
        except ValueError as e:
            if not is_distributed(group):
                raise
            moments, n_batches, failure = {}, 0, str(e)
        _reduce(moments, group_sites, n_batches, group, failure)
        for s in group_sites:   # in forward order: the sums below do not depend on the passes
            m = moments.pop(s, None)
            if m is not None:
                reached.add(s)
                samples = max(samples, int(float(m.count)))
                c, const_a, const_b = _corr(m, s)
                del m
                for p in s.perms:
                    varying[p][0] += c.shape[0] - const_a
                    varying[p][1] += c.shape[1] - const_b
                if s in kept:
                    corr[s] = c
                else:
                    p = s.perms[0]
                    cost[p] = cost[p].add_(c) if p in cost else c
                del c
            for p in s.perms:
                left[p] -= 1
                if left[p] == 0 and p in cost:
                    perms[p], before, after = _solve_alone(cost.pop(p), solver)
                    alone["before"] += before
                    alone["after"] += after
    missing = [s for s in sites if s not in reached and s not in shared]
    if missing:
        warnings.warn(f"activation_matching: sites never reached by the forward pass: {missing}", stacklevel=2)
    empty = [p for p in sizes if not any(p in s.perms for s in reached)]
    if empty:
        raise ValueError(f"activation_matching: no activations were captured for perms {empty}")
    flat = sorted(p for p, (va, vb) in varying.items() if va == 0 or vb == 0)
    if flat:
        warnings.warn(f"activation_matching: no unit of perm group(s) {flat[:6]}{' ...' if len(flat) > 6 else ''} "
                      f"varies over the data ({samples} samples per site) in model A or B: "
                      "their correlations are undefined and they keep the identity; pass more, or more varied, data",
                      stacklevel=2)
    if spec.nested:   # nested perms: family by family (matching/nested_activation.py)
        history, sweeps = family_descent(corr, sizes, coupled, perms, alone, max_iter, solver, spec, _IDENTITY_TIE)
    else:
        history, sweeps = _coordinate_descent(corr, sizes, coupled, perms, alone, max_iter, solver)
    # every rank solved the same reduced statistics; rank 0's answer is the one all return, so hosts
    # whose LAP rounding differs cannot disagree
    return broadcast_object(MatchResult(perms=perms, objective=history, iterations=sweeps), 0, group)


def _coordinate_descent(corr, sizes, coupled, perms, alone, max_iter, solver) -> tuple[list[float], int]:
    """Solve the coupled perms (factors of joint sites) by coordinate descent over their kept
    correlations, in place in `perms`; the objective history adds the perms solved alone."""
    def objective() -> float:
        total = alone["after"]
        for s, c in corr.items():
            names = list(s.perms)
            idx = torch.arange(c.shape[0]).reshape([sizes[q] for q in names])
            for f, q in enumerate(names):  # B's joint unit index under the current perms
                idx = idx.index_select(f, perms[q])
            total += float(c[torch.arange(c.shape[0]), idx.reshape(-1)].sum())
        return total

    history = [objective() - alone["after"] + alone["before"]]
    if not coupled:
        return history + [alone["after"]], 1
    solved: set[str] = set()
    order = sorted(coupled, key=lambda p: (sizes[p], p))  # coarse factors (heads) before fine ones
    sweeps = 0
    for _ in range(max(1, max_iter)):
        sweeps += 1
        changed = False
        for p in order:
            cost = sum(_factor_cost(c, s, p, sizes, perms, solved) for s, c in corr.items() if p in s.perms)
            new = solve_lap(cost + _IDENTITY_TIE * torch.eye(sizes[p], dtype=cost.dtype), solver=solver)
            r = torch.arange(sizes[p])
            first = p not in solved
            solved.add(p)
            if first or float(cost[r, new].sum() - cost[r, perms[p]].sum()) > 1e-12:
                # a coupled factor's first solve used a provisional cost: always re-check it
                changed = changed or not torch.equal(new, perms[p]) or first
                perms[p] = new
        history.append(objective())
        if not changed:
            break
    return history, sweeps
