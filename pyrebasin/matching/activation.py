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

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import batches, check_batch_size
from ..distributed import all_reduce_moments_, broadcast_object, gather_objects, is_distributed
from ..module_state import check_finite_state, mode_view, model_state
from ..moments import CrossMoments
from ..spec import Blocked, PermutationSpec
from .lap import solve_lap
from .weight import MatchResult

__all__ = ["activation_matching", "find_sites", "Site"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Site:
    """Where a perm's units are read: the input ("in") or output ("out") of `module`, along `dim`
    (-1 for Linear, 1 for Conv), that dim being `entry` (a perm name or a Blocked factorisation)."""

    module: str
    where: str
    dim: int
    entry: str | Blocked

    @property
    def perms(self) -> tuple[str, ...]:
        if isinstance(self.entry, str):
            return (self.entry,)
        return tuple(p for p in self.entry.perms if p is not None)


def find_sites(model: nn.Module, spec: PermutationSpec) -> list[Site]:
    """The activation sites of every perm group (see the module docstring); raises ValueError
    naming a perm that has none."""
    consumers: dict[str, list[Site]] = {}
    producers: dict[str, list[Site]] = {}
    for key, entries in spec.axes_to_perm.items():
        mod_name, _, leaf = key.rpartition(".")
        if leaf != "weight":
            continue
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            dim = -1
        elif isinstance(module, _CONV):
            dim = 1
        else:
            continue
        for axis, table in ((1, consumers), (0, producers)):
            entry = entries[axis] if axis < len(entries) else None
            if entry is None or (isinstance(entry, Blocked) and all(p is None for p in entry.perms)):
                continue
            site = Site(mod_name, "in" if axis == 1 else "out", dim, entry)
            for p in site.perms:
                table.setdefault(p, []).append(site)
    sites: list[Site] = []
    for p in spec.perm_names:
        chosen = consumers.get(p) or producers.get(p)
        if not chosen:
            raise ValueError(f"activation_matching: perm {p!r} permutes no Linear/Conv weight of the model, "
                             "so no activation site was found for it; use weight_matching for this model")
        sites.extend(s for s in chosen if s not in sites)
    return sites


def _site_view(t: torch.Tensor, site: Site, sizes: Mapping[str, int]) -> tuple[torch.Tensor, int]:
    """The site's activation as a tensor whose `channel_dim` holds its permuted units (jointly, for
    several permuted factors); every other position is a sample."""
    d = site.dim % t.dim()
    if isinstance(site.entry, str):
        return t, d
    shape = site.entry.shape
    t = t.reshape(t.shape[:d] + shape + t.shape[d + 1:])
    factors = [d + f for f, p in enumerate(site.entry.perms) if p is not None]
    if len(factors) == 1:
        return t, factors[0]
    t = t.movedim(factors, list(range(d, d + len(factors))))
    return t.reshape(t.shape[:d] + (-1,) + t.shape[d + len(factors):]), d


def _to(x, device):
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, Mapping) else x.to(device)


def _states(model: nn.Module, state, name: str, spec: PermutationSpec):
    """(full state for functional_call, state for the spec check): the model's own tensors by default
    (non-persistent buffers included, which a spec of state-dict keys does not declare)."""
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


@torch.no_grad()
def _collect(model_a, model_b, state_a, state_b, sites, sizes, data, batch_size, max_batches, progress):
    moments: dict[Site, CrossMoments] = {}
    captured: dict[Site, torch.Tensor] = {}
    seen: set = set()
    shared: set[Site] = set()  # sites whose tensor another site already counted

    def make_hook(site: Site):
        def hook(module, args, output=None):
            t = args[0] if site.where == "in" else output
            # q/k/v (or a block's conv1 and shortcut) read one input: count it once
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), site.entry)
            if key in seen:
                shared.add(site)
                return
            seen.add(key)
            captured[site] = t.detach()
        return hook

    def run(model, state):
        captured.clear()
        seen.clear()
        handles = []
        try:
            for s in sites:
                m = model.get_submodule(s.module)
                handles.append(m.register_forward_pre_hook(make_hook(s)) if s.where == "in"
                               else m.register_forward_hook(make_hook(s)))
            torch.func.functional_call(model, state, (batch,))
        finally:
            for h in handles:
                h.remove()
        return dict(captured)

    device = next(iter(state_a.values())).device if state_a else torch.device("cpu")
    n = 0
    stream = batches(data, batch_size=batch_size, labels="ignored", name="activation_matching: data")
    for x, _ in tqdm(stream, desc="activation statistics", disable=not progress, leave=False):
        if max_batches is not None and n >= max_batches:
            break
        batch = _to(x, device)
        acts_a, acts_b = run(model_a, state_a), run(model_b, state_b)
        for s in sites:
            if s not in acts_a or s not in acts_b:
                continue  # this site's tensor was already counted under another module (shared input)
            xa, cd = _site_view(acts_a[s], s, sizes)
            xb, _ = _site_view(acts_b[s], s, sizes)
            if s not in moments:
                moments[s] = CrossMoments(xa.shape[cd], xb.shape[cd], device=xa.device)
            moments[s].update(xa, xb, channel_dim=cd)
        n += 1
    return moments, shared, n


def _reduce(moments, shared, sites, n, group, failure: str | None = None) -> None:
    """Sum every rank's statistics in place (one all-reduce); all ranks first agree that each has data
    and reached the same sites, so a bad shard is a ValueError on every rank, never a hang."""
    mine = (n, [(i, tuple(moments[s].sum_xy.shape)) for i, s in enumerate(sites) if s in moments],
            [i for i, s in enumerate(sites) if s in shared], failure)
    everyone = gather_objects(mine, group) if is_distributed(group) else [mine]
    failed = [(r, e[3]) for r, e in enumerate(everyone) if e[3] is not None]
    if failed:
        raise ValueError("; ".join(f"rank {r}: {msg}" for r, msg in failed))
    everyone = [e[:3] for e in everyone]
    empty = [r for r, e in enumerate(everyone) if e[0] == 0]
    if empty:
        where = f" on rank(s) {empty}" if len(everyone) > 1 else ""
        raise ValueError(f"activation_matching: `data` yielded no batches{where}")
    odd = [r for r, e in enumerate(everyone) if e[1:] != everyone[0][1:]]
    if odd:
        raise ValueError(f"activation_matching: rank(s) {odd} reached other activation sites (or widths) than "
                         "rank 0; every rank must run the same models on data of the same form")
    all_reduce_moments_([moments[s] for s in sites if s in moments], group)


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
    """The site's correlation with rows/columns of constant units zeroed, and the number of constant
    units of A and of B; an activation that overflowed is an error naming the module."""
    n = m.count.clamp_min(1)
    const_a = m.var_x <= _CONSTANT_RTOL**2 * (m.sum_xx / n)
    const_b = m.var_y <= _CONSTANT_RTOL**2 * (m.sum_yy / n)
    c = m.corr()
    if not bool(torch.isfinite(c).all()) or not bool(torch.isfinite(m.sum_xx).all() & torch.isfinite(m.sum_yy).all()):
        raise ValueError(f"activation_matching: the activations at the {site.where}put of {site.module!r} are "
                         "not finite (an overflow or an invalid operation); check the data's scale and the weights")
    c = c.masked_fill(const_a[:, None] | const_b[None, :], 0.0)
    return c.cpu(), int(const_a.sum()), int(const_b.sum())


@torch.no_grad()
def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data,
                        *, state_a: Mapping[str, torch.Tensor] | None = None,
                        state_b: Mapping[str, torch.Tensor] | None = None, batch_size: int = 512,
                        max_batches: int | None = None, max_iter: int = 100, solver: str | None = None,
                        progress: bool = False, group=None) -> MatchResult:
    """Permutations of B's units maximising the summed correlation of A's and B's activations.

    `data`: any form `pyrebasin.batches.batches` reads — a tensor of inputs or an `(x, y)` pair (split
    into `batch_size` rows; labels unused), an iterable of batches or a DataLoader. Non-finite inputs
    or weights are refused (ValueError naming them). Both models run in eval mode on private views
    (`mode_view`) through `torch.func.functional_call` on `state_a` / `state_b` (default: each model's
    own tensors, non-persistent buffers included), so neither model, its flags nor a state is modified.
    Units whose activation is constant over the data (dead units, a single sample, constant inputs)
    correlate with nothing; ties go to the identity, so a model matched with itself gets the identity;
    a group with no varying unit at all keeps the identity, with a warning. Returns `MatchResult`:
    `objective` holds Σ of matched correlations (identity first, then after each sweep); `iterations`
    the sweeps (1 unless factors couple).

    Under torch.distributed (`group`: None = the default group when initialised, a group, or False for
    this process alone) each rank passes its own shard of the data (`max_batches` counts per rank): the
    statistics are summed over the ranks in one all-reduce, and every rank returns rank 0's result,
    that of one process reading all shards (to float64 rounding). Identical data on every rank gives
    the single-process result too (the correlations of repeated data are those of the data).
    """
    check_batch_size(batch_size)
    check_batch_size(max_batches, "max_batches", allow_none=True)
    check_batch_size(max_iter, "max_iter")
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
    failure = None
    try:
        moments, shared, n_batches = _collect(view_a, view_b, state_a, state_b, sites, sizes, data, batch_size,
                                              max_batches, progress)
    except ValueError as e:   # bad data on this rank: every rank must hear of it before the collective
        if not is_distributed(group):
            raise
        moments, shared, n_batches, failure = {}, set(), 0, str(e)
    _reduce(moments, shared, sites, n_batches, group, failure)
    missing = [s for s in sites if s not in moments and s not in shared]
    if missing:
        warnings.warn(f"activation_matching: sites never reached by the forward pass: {missing}", stacklevel=2)
    corr, varying = {}, {p: [0, 0] for p in sizes}
    for s, m in moments.items():
        corr[s], const_a, const_b = _corr(m, s)
        for p in s.perms:
            varying[p][0] += corr[s].shape[0] - const_a
            varying[p][1] += corr[s].shape[1] - const_b
    by_perm = {p: [s for s in corr if p in s.perms] for p in sizes}
    empty = [p for p, s in by_perm.items() if not s]
    if empty:
        raise ValueError(f"activation_matching: no activations were captured for perms {empty}")
    flat = sorted(p for p, (va, vb) in varying.items() if va == 0 or vb == 0)
    if flat:
        samples = int(max(float(m.count) for m in moments.values()))
        warnings.warn(f"activation_matching: no unit of perm group(s) {flat[:6]}{' ...' if len(flat) > 6 else ''} "
                      f"varies over the data ({samples} samples per site) in model A or B: "
                      "their correlations are undefined and they keep the identity; pass more, or more varied, data",
                      stacklevel=2)
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    coupled = {p for p in sizes if any(len(s.perms) > 1 for s in by_perm[p])}

    def objective() -> float:
        total = 0.0
        for s, c in corr.items():
            names = list(s.perms)
            idx = torch.arange(c.shape[0]).reshape([sizes[q] for q in names])
            for f, q in enumerate(names):  # B's joint unit index under the current perms
                idx = idx.index_select(f, perms[q])
            total += float(c[torch.arange(c.shape[0]), idx.reshape(-1)].sum())
        return total

    history = [objective()]
    solved: set[str] = set()
    order = sorted(sizes, key=lambda p: (sizes[p], p))  # coarse factors (heads) before fine ones
    sweeps = 0
    for _ in range(max(1, max_iter)):
        sweeps += 1
        changed = False
        for p in order:
            if p in solved and p not in coupled:
                continue
            cost = sum(_factor_cost(c, s, p, sizes, perms, solved) for s, c in corr.items() if p in s.perms)
            new = solve_lap(cost + _IDENTITY_TIE * torch.eye(sizes[p], dtype=cost.dtype), solver=solver)
            r = torch.arange(sizes[p])
            first = p not in solved
            solved.add(p)
            if first or float(cost[r, new].sum() - cost[r, perms[p]].sum()) > 1e-12:
                # a coupled factor's first solve used a provisional cost: always re-check it
                changed = changed or not torch.equal(new, perms[p]) or (first and p in coupled)
                perms[p] = new
        history.append(objective())
        if not changed or not coupled:
            break
    # every rank solved the same reduced statistics; rank 0's answer is the one all return, so hosts
    # whose LAP rounding differs cannot disagree
    return broadcast_object(MatchResult(perms=perms, objective=history, iterations=sweeps), 0, group)
