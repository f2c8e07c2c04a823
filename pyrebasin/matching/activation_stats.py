"""Where activation matching reads a perm's units (its sites) and how their moments are gathered: any
batch form (tensors, token ids, dicts with `attention_mask`, whose padding is left out), the sites
split into passes over the data so that at most a memory budget of moments is alive at once.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import batches
from ..moments import CrossMoments
from ..spec import Blocked, PermutationSpec

__all__ = ["Site", "find_sites", "site_view", "site_width", "model_forward", "token_mask",
           "probe_sites", "plan_passes", "gather_moments"]

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
    """The activation sites of every perm group (see `activation_matching`); raises ValueError
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


def site_width(site: Site, sizes: Mapping[str, int]) -> int:
    """The number of (joint) units a site's moments cover: the product of its permuted factors (a
    Blocked factor's own size: a nested perm's inner factor holds one block, not the whole perm)."""
    if isinstance(site.entry, str):
        return sizes[site.entry]
    return math.prod(n for n, p in zip(site.entry.shape, site.entry.perms) if p is not None)


def site_view(t: torch.Tensor, site: Site) -> tuple[torch.Tensor, int]:
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


def model_forward(model: nn.Module, state, x, extra: Mapping | None = None):
    """`functional_call` on one batch: a mapping of inputs as keyword arguments (token dicts), a tensor
    as the positional input; `extra` keywords (`lm.model_kwargs`: use_cache=False) unless the batch sets them."""
    kwargs = {**(extra or {}), **x} if isinstance(x, Mapping) else dict(extra or {})
    args = () if isinstance(x, Mapping) else (x,)
    return torch.func.functional_call(model, state, args, kwargs)


def token_mask(x) -> torch.Tensor | None:
    """The batch's `attention_mask` as a bool [batch, tokens] tensor (True = a real token), or None."""
    if not isinstance(x, Mapping) or x.get("attention_mask") is None:
        return None
    mask = x["attention_mask"]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("activation_matching: attention_mask must be a [batch, tokens] tensor, got "
                         f"{list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    ids = x.get("input_ids")
    if isinstance(ids, torch.Tensor) and tuple(ids.shape) != tuple(mask.shape):
        raise ValueError(f"activation_matching: attention_mask has shape {list(mask.shape)} but input_ids "
                         f"{list(ids.shape)}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("activation_matching: attention_mask must hold 0 (padding) and 1 (token), got "
                         f"values {sorted(set(mask.unique().tolist()))[:6]}")
    return mask.to(torch.bool)


def _real_tokens(t: torch.Tensor, site: Site, mask: torch.Tensor | None) -> torch.Tensor:
    """The activation at the real tokens only: [B, T, ..., n] -> [tokens, ..., n] under the mask."""
    if mask is None:
        return t
    if t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask.shape) and site.dim % t.dim() >= 2:
        return t[mask.to(t.device)]
    if t.dim() == 2 and t.shape[0] == mask.shape[0] and site.dim % t.dim() == 1:
        return t  # one vector per sequence (a pooled head): no padding to leave out
    raise ValueError(f"activation_matching: the activation at the {site.where}put of {site.module!r} has shape "
                     f"{list(t.shape)}, which does not start with the attention_mask's {list(mask.shape)}, so "
                     "its padding cannot be left out")


def _first_row(x):
    if isinstance(x, Mapping):
        rows = x["input_ids"].shape[0] if isinstance(x.get("input_ids"), torch.Tensor) else None
        return {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
                for k, v in x.items()}
    return x[:1]


class _Stop(Exception):
    """Raised by a hook once a pass has read every site it needs: the rest of the forward is skipped."""


def _hooks(model: nn.Module, sites, make):
    handles = []
    for s in sites:
        m = model.get_submodule(s.module)
        hook = make(s)
        handles.append(m.register_forward_pre_hook(lambda mod, args, h=hook: h(args[0])) if s.where == "in"
                       else m.register_forward_hook(lambda mod, args, out, h=hook: h(out)))
    return handles


def _run(model, state, x, extra, handles) -> None:
    try:
        model_forward(model, state, x, extra)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def probe_sites(runs, sites: list[Site], x) -> tuple[list[Site], set[Site], dict[Site, int]]:
    """One forward per (model, state, extra keywords) run on the first row of batch `x`: (the sites in the order
    the forward reaches them, then the unreached ones; the sites whose tensor another site already
    read — q/k/v of one input, counted once; how often each site's module runs per forward)."""
    order: list[Site] = []
    shared: set[Site] = set()
    calls: dict[Site, int] = {}
    x1 = _first_row(x)
    for i, (model, state, extra) in enumerate(runs):
        seen, alive = set(), []   # tensors kept alive: a freed one's address could be reused

        def make(site):
            def hook(t):
                key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), site.entry)
                alive.append(t)
                if i == 0:
                    calls[site] = calls.get(site, 0) + 1
                if key in seen:
                    shared.add(site)
                    return
                seen.add(key)
                if site not in order:
                    order.append(site)
            return hook
        _run(model, state, x1, extra, _hooks(model, sites, make))
    order = [s for s in order if s not in shared]
    return order + [s for s in sites if s not in order and s not in shared], shared, calls


def plan_passes(order: list[Site], sizes: Mapping[str, int], kept: set[Site], max_memory: int | None,
                dtype: torch.dtype) -> list[list[Site]]:
    """Split the sites (in `order`) into consecutive passes whose moments, with what earlier passes keep
    (the correlations of `kept` sites and the running cost sums of perms whose sites span passes),
    fit in `max_memory` bytes; one pass when None. ValueError when one site alone does not fit."""
    if max_memory is None:
        return [list(order)] if order else []
    elem = torch.empty((), dtype=dtype).element_size()
    first, last = {}, {}
    for i, s in enumerate(order):
        for p in s.perms:
            first.setdefault(p, i)
            last[p] = i

    def held_after(j: int) -> int:   # bytes alive between passes once sites order[:j+1] are done
        corr = sum(site_width(s, sizes) ** 2 for s in order[:j + 1] if s in kept)
        costs = sum(sizes[p] ** 2 for p in first if first[p] <= j < last[p]
                    and not any(s in kept for s in order if p in s.perms))
        return elem * (corr + costs)

    passes, current, used, held = [], [], 0, 0
    for i, s in enumerate(order):
        w = site_width(s, sizes)
        need = CrossMoments.nbytes(w, w, dtype=dtype)
        if current and held + used + need > max_memory:
            passes.append(current)
            held, current, used = held_after(i - 1), [], 0
        if held + need > max_memory:
            raise ValueError(f"activation_matching: max_memory={max_memory} bytes is too small: the moments of "
                             f"the {s.where}put of {s.module!r} ({w} units, {need} bytes) do not fit next to the "
                             f"{held} bytes earlier passes keep; allow at least {held + need} bytes")
        current.append(s)
        used += need
    return passes + ([current] if current else [])


@torch.no_grad()
def gather_moments(run_a, run_b, group: list[Site], calls: Mapping[Site, int], data, *, batch_size: int,
                   max_batches: int | None, dtype: torch.dtype, device, progress: bool, desc: str):
    """One pass over `data`: the moments of the `group` sites (A's activations at a site paired with
    B's, call by call, real tokens only). Each batch runs A until it has read every group site, then B
    until each of those is paired. Returns ({site: CrossMoments}, batches read)."""
    moments: dict[Site, CrossMoments] = {}
    wanted = set(group)
    queued: dict[Site, deque] = {}
    state = {"mask": None, "pending": 0}

    def make_a(site):
        def hook(t):
            queued.setdefault(site, deque()).append(t.detach())
            state["pending"] += 1
            if len(queued) == len(wanted) and all(len(queued[s]) >= calls.get(s, 1) for s in wanted):
                raise _Stop
        return hook

    def make_b(site):
        def hook(t):
            if not queued.get(site):
                return  # A did not reach this call (its pass stopped earlier): nothing to pair
            xa = _real_tokens(queued[site].popleft(), site, state["mask"])
            xb = _real_tokens(t.detach(), site, state["mask"])
            va, cd = site_view(xa, site)
            vb, _ = site_view(xb, site)
            if site not in moments:
                moments[site] = CrossMoments(va.shape[cd], vb.shape[cd], device=va.device, dtype=dtype)
            moments[site].update(va, vb, channel_dim=cd)
            state["pending"] -= 1
            if state["pending"] == 0:
                raise _Stop
        return hook

    n = 0
    stream = batches(data, batch_size=batch_size, labels="ignored", name="activation_matching: data")
    for x, _ in tqdm(stream, desc=desc, disable=not progress, leave=False):
        if max_batches is not None and n >= max_batches:
            break
        x = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()} \
            if isinstance(x, Mapping) else x.to(device)
        state["mask"] = token_mask(x)
        queued.clear()
        state["pending"] = 0
        (model_a, state_a, extra_a), (model_b, state_b, extra_b) = run_a, run_b
        _run(model_a, state_a, x, extra_a, _hooks(model_a, group, make_a))
        if state["pending"]:
            _run(model_b, state_b, x, extra_b, _hooks(model_b, group, make_b))
        queued.clear()
        n += 1
    return moments, n
