"""Two-level attention-head matching (Verma & Elbayad): heads matched as units from head-level costs, then
the dimensions inside each matched head pair; q and k share their within-head perm, RoPE is respected.

Head-level cost of (head i of A, head j of B): the best within-head assignment value of the v/o
correlation block (A's attention output dims of head i against B's of head j) plus that of the q+k
block (learned positions; q and k take one perm so every score q·k is kept), or, under RoPE, the
trace of the q+k block (rotary dimension pairs are tied to their frequency: no within-head q/k
permutation keeps the function, only whole heads move). One LAP over heads on that cost; each
matched pair keeps its own inner perms. The result fills a spec with one flat perm per layer over
the q/k (and v/o) dimensions (`GPT.permutation_spec("per_head")`), which moves whole heads.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import batches, check_batch_size
from ..module_state import check_finite_state, mode_view, model_state
from ..moments import CrossMoments
from ..spec import PermutationSpec
from .lap import solve_lap
from .weight import MatchResult

__all__ = ["HeadLayout", "cross_moments_at", "head_costs", "two_level_matching"]


@dataclass(frozen=True)
class HeadLayout:
    """One attention layer: its q/k projections and output projection (module names), heads x head_dim,
    whether q/k are rotary, and the perm names of its shared form (`heads_perm`, `qk_perm` — None under
    RoPE — and `vo_perm`, Blocked (heads, head_dim)) and its per-head form (`qk_flat`, `vo_flat`)."""

    q: str
    k: str
    o: str
    heads: int
    head_dim: int
    rotary: bool
    heads_perm: str
    qk_perm: str | None
    vo_perm: str
    qk_flat: str
    vo_flat: str


def _to(x, device):
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, Mapping) else x.to(device)


@torch.no_grad()
def cross_moments_at(model_a: nn.Module, model_b: nn.Module, points: Mapping[str, tuple[str, str]], data, *,
                     state_a: Mapping[str, torch.Tensor] | None = None,
                     state_b: Mapping[str, torch.Tensor] | None = None, batch_size: int = 256,
                     max_batches: int | None = None, progress: bool = False,
                     pool: Mapping[str, str] | None = None) -> dict[str, CrossMoments]:
    """Cross moments of A's and B's activations (features last) at named points: `points[name] =
    (module, "in" | "out")` (the module's first input or its output). `pool[name] = group`: several
    points summed into one group's moments (a residual stream read at every norm). Both models run on
    eval-mode views through `functional_call` on their states (default: their own tensors)."""
    check_batch_size(batch_size)
    check_batch_size(max_batches, "max_batches", allow_none=True)
    states = []
    for name, model, state in (("state_a", model_a, state_a), ("state_b", model_b, state_b)):
        state = model_state(model) if state is None else dict(state)
        check_finite_state(state, f"cross_moments_at: {name}")
        states.append(state)
    pool = dict(pool or {})
    views = (mode_view(model_a), mode_view(model_b))
    for view in views:
        missing = [m for m, _ in points.values() if m not in dict(view.named_modules())]
        if missing:
            raise ValueError(f"cross_moments_at: modules {missing[:4]} are not in the model")
        bad = [w for _, w in points.values() if w not in ("in", "out")]
        if bad:
            raise ValueError(f"cross_moments_at: where={bad[0]!r}; expected 'in' or 'out'")
    moments: dict[str, CrossMoments] = {}
    device = next(iter(states[0].values())).device

    def run(view, state, x):
        got, handles = {}, []
        for name, (mod, where) in points.items():
            m = view.get_submodule(mod)
            if where == "in":
                handles.append(m.register_forward_pre_hook(lambda _m, args, n=name: got.__setitem__(n, args[0])))
            else:
                handles.append(m.register_forward_hook(lambda _m, _a, out, n=name: got.__setitem__(n, out)))
        try:
            torch.func.functional_call(view, state, (x,))
        finally:
            for h in handles:
                h.remove()
        return got

    n = 0
    for x, _ in tqdm(batches(data, batch_size=batch_size, labels="ignored", name="cross_moments_at: data"),
                     desc="activation statistics", disable=not progress, leave=False):
        if max_batches is not None and n >= max_batches:
            break
        x = _to(x, device)
        got_a, got_b = run(views[0], states[0], x), run(views[1], states[1], x)
        for name in points:
            key = pool.get(name, name)
            xa, xb = got_a[name], got_b[name]
            if key not in moments:
                moments[key] = CrossMoments(xa.shape[-1], xb.shape[-1], device=xa.device)
            moments[key].update(xa, xb, channel_dim=-1)
        n += 1
    if n == 0:
        raise ValueError("cross_moments_at: `data` yielded no batches")
    return moments


def _inner(block: torch.Tensor) -> tuple[float, torch.Tensor]:
    perm = solve_lap(block)
    return float(block[torch.arange(block.shape[0]), perm].sum()), perm


def head_costs(corr_qk: torch.Tensor, corr_vo: torch.Tensor, layout: HeadLayout
               ) -> tuple[torch.Tensor, dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]]:
    """(head-level cost [heads, heads], inner perms (qk, vo) of every head pair) from the q+k and the
    v/o correlations [d, d] of one layer (see the module docstring)."""
    h, hd = layout.heads, layout.head_dim
    cost = torch.zeros(h, h, dtype=torch.float64)
    inner = {}
    eye = torch.arange(hd)
    for i in range(h):
        for j in range(h):
            rows, cols = slice(i * hd, (i + 1) * hd), slice(j * hd, (j + 1) * hd)
            v_val, v_perm = _inner(corr_vo[rows, cols])
            if layout.rotary:
                q_val, q_perm = float(torch.diagonal(corr_qk[rows, cols]).sum()), eye
            else:
                q_val, q_perm = _inner(corr_qk[rows, cols])
            cost[i, j] = v_val + q_val
            inner[i, j] = (q_perm, v_perm)
    return cost, inner


def _corr(m: CrossMoments) -> torch.Tensor:
    return m.corr().to("cpu", torch.float64)


@torch.no_grad()
def two_level_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, layout: Sequence[HeadLayout],
                       data, *, state_a: Mapping[str, torch.Tensor] | None = None,
                       state_b: Mapping[str, torch.Tensor] | None = None, base: MatchResult | None = None,
                       batch_size: int = 256, max_batches: int | None = None, progress: bool = False) -> MatchResult:
    """Activation matching with two-level head assignment. `spec`: the model's shared-head spec (its
    non-attention groups — residual, MLP units — come from `base`, default `activation_matching` on
    it); `layout`: the attention layers (`GPT.head_layout()`). Returns perms for the per-head spec:
    every non-attention group of `spec` plus each layer's `qk_flat` and `vo_flat` (whole heads moved,
    each with its own within-head perm). `objective`: Σ of the matched head-level costs."""
    if not layout:
        raise ValueError("two_level_matching: layout lists no attention layer")
    if base is None:
        from .activation import activation_matching
        base = activation_matching(model_a, model_b, spec, data, state_a=state_a, state_b=state_b,
                                   batch_size=batch_size, max_batches=max_batches, progress=progress)
    attn = {p for lay in layout for p in (lay.heads_perm, lay.qk_perm, lay.vo_perm) if p is not None}
    unknown = sorted(attn - set(spec.perm_names))
    if unknown:
        raise ValueError(f"two_level_matching: layout names perms the spec lacks: {unknown[:4]}")
    perms = {p: v.clone() for p, v in base.perms.items() if p not in attn}
    points, pool = {}, {}
    for i, lay in enumerate(layout):
        points |= {f"{i}.q": (lay.q, "out"), f"{i}.k": (lay.k, "out"), f"{i}.vo": (lay.o, "in")}
        pool |= {f"{i}.q": f"{i}.qk", f"{i}.k": f"{i}.qk"}   # q and k share one within-head perm
    moments = cross_moments_at(model_a, model_b, points, data, state_a=state_a, state_b=state_b,
                               batch_size=batch_size, max_batches=max_batches, progress=progress, pool=pool)
    total = 0.0
    for i, lay in enumerate(layout):
        cost, inner = head_costs(_corr(moments[f"{i}.qk"]), _corr(moments[f"{i}.vo"]), lay)
        heads = solve_lap(cost + 1e-9 * torch.eye(lay.heads, dtype=cost.dtype))
        total += float(cost[torch.arange(lay.heads), heads].sum())
        hd = lay.head_dim
        qk = torch.cat([heads[a] * hd + inner[a, int(heads[a])][0] for a in range(lay.heads)])
        vo = torch.cat([heads[a] * hd + inner[a, int(heads[a])][1] for a in range(lay.heads)])
        perms[lay.qk_flat], perms[lay.vo_flat] = qk.long(), vo.long()
    return MatchResult(perms=perms, objective=[total], iterations=1)
