"""RESET (recompute BatchNorm statistics) and REPAIR (Jordan et al. 2023: renormalise each channel of
an interpolated network to the interpolated endpoint statistics), for BN, LayerNorm and norm-free nets.

Both run one pass over the data in which every repair point (a BatchNorm or per-channel LayerNorm/
GroupNorm, or a conv/linear whose output no such norm consumes) is renormalised with its batch
statistics — so later layers see repaired inputs, as in the paper's train-mode pass — then fold the
averaged statistics into the state: BatchNorm running stats + affine, the LN/GN affine, or the
producing conv/linear weight and bias.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ._batched_stats import reset_chunk
from .batches import batches, check_batch_size, finite_float, require_reiterable
from .distributed import all_reduce_moments_, all_reduce_sum_, check_same, is_distributed, raise_together
from .module_state import check_pair, check_state, lerp_state, mode_view
from .moments import CrossMoments

__all__ = ["RepairPoint", "EndpointStats", "find_points", "endpoint_stats", "renormalize", "repair", "reset_bn",
           "RepairCorrection", "ResetCorrection"]

State = Mapping[str, torch.Tensor]
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm
_LN = (nn.LayerNorm, nn.GroupNorm)


def _per_channel_norm(m: nn.Module) -> bool:
    """A LayerNorm/GroupNorm whose affine is one (weight, bias) pair per channel: REPAIR folds there."""
    if isinstance(m, nn.GroupNorm):
        return m.affine
    if isinstance(m, nn.LayerNorm):
        return m.weight is not None and len(m.normalized_shape) == 1
    return False


@dataclass(frozen=True)
class RepairPoint:
    """A module whose output channels REPAIR renormalises: kind "bn" (a BatchNorm: statistics of its
    input, folded into running stats and affine) or "affine" (a conv/linear, or a LayerNorm/GroupNorm
    with a per-channel affine: folded into its weight and bias). `channel_dim` is where its output
    keeps channels (1 for conv/BN/GroupNorm, -1 for linear/LayerNorm)."""

    name: str
    kind: str
    channel_dim: int


def _inputs(data, batch_size: int | None, what: str = "statistics data"):
    """Input batches of statistics data: inputs alone, an (x, y) pair, or (x, y) / x batches, a DataLoader."""
    check_batch_size(batch_size, allow_none=True)
    return (x for x, _ in batches(data, batch_size=batch_size, labels="ignored", name=what))


@contextlib.contextmanager
def _hooks(model: nn.Module, fns: Mapping[str, object], pre: bool = False):
    """Hook modules of a private view for a block (removed on exit, whatever happens)."""
    mods = dict(model.named_modules())
    handles = []
    try:
        for name, fn in fns.items():
            m = mods[name]
            handles.append(m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _point(name: str, module: nn.Module) -> RepairPoint:
    if isinstance(module, _BN):
        return RepairPoint(name, "bn", 1)
    if isinstance(module, _AFFINE) or _per_channel_norm(module):
        return RepairPoint(name, "affine", -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1)
    raise ValueError(f"REPAIR point {name!r} is a {type(module).__name__}; expected a BatchNorm, "
                     "LayerNorm/GroupNorm with a per-channel affine, Linear or Conv")


@torch.no_grad()
def find_points(model: nn.Module, state: State, example: torch.Tensor,
                names: Sequence[str] | None = None) -> list[RepairPoint]:
    """The channels REPAIR renormalises, found by one traced forward on `example` (a few inputs):
    every BatchNorm and per-channel-affine LayerNorm/GroupNorm, plus every conv/linear whose output
    neither feeds such a norm directly nor is the model's output (the logits). `names` picks modules
    by hand instead."""
    mods = dict(model.named_modules())
    if names is not None:
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"REPAIR points {missing} are not modules of the model")
        return [_point(n, mods[n]) for n in names]
    outputs: dict[str, torch.Tensor] = {}
    norm_inputs: list[torch.Tensor] = []
    order: list[str] = []

    def record(name):
        def hook(m, inputs, out):
            order.append(name)
            if isinstance(m, _BN) or _per_channel_norm(m):
                norm_inputs.append(inputs[0])
            outputs[name] = out
        return hook

    watch = {n: record(n) for n, m in mods.items() if isinstance(m, (_BN,) + _AFFINE) or _per_channel_norm(m)}
    view = mode_view(model)
    with _hooks(view, watch):
        final = functional_call(view, dict(state), (example,))
    points = []
    for name in dict.fromkeys(order):  # forward order, each module once
        m = mods[name]
        if isinstance(m, _BN) or _per_channel_norm(m):
            points.append(_point(name, m))
        elif not any(outputs[name] is t for t in norm_inputs) and outputs[name] is not final:
            if m.bias is None:
                raise ValueError(f"REPAIR cannot shift the channels of {name!r}: it has no bias and no "
                                 "BatchNorm follows it (pass points= to choose layers by hand)")
            points.append(_point(name, m))
    return points


def _channel_stats(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and variance of each channel over every other position."""
    xs = x.movedim(dim, -1).reshape(-1, x.shape[dim])
    var, mean = torch.var_mean(xs, dim=0, correction=0)
    return mean, var


@dataclass
class EndpointStats:
    """Per-channel mean and std (float64) of each repair point's output in both endpoint networks."""

    points: list[RepairPoint]
    mean_a: dict[str, torch.Tensor]
    std_a: dict[str, torch.Tensor]
    mean_b: dict[str, torch.Tensor]
    std_b: dict[str, torch.Tensor]

    def targets(self, t: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """REPAIR's goal at t: μ_t = (1−t)μ_A + tμ_B and σ_t = (1−t)σ_A + tσ_B per channel."""
        return {p.name: (torch.lerp(self.mean_a[p.name], self.mean_b[p.name], float(t)),
                         torch.lerp(self.std_a[p.name], self.std_b[p.name], float(t))) for p in self.points}


def _locally(spread: bool, group, fn, *args):
    """`fn(*args)`; under a process group a ValueError on any rank is raised on every rank."""
    if not spread:
        return fn(*args)
    out, error = None, None
    try:
        out = fn(*args)
    except ValueError as exc:
        error = exc
    raise_together(error, group)
    return out


def _endpoint_moments(model, state_a, state_b, data, points, batch_size, progress):
    acts: dict[str, torch.Tensor] = {}
    moments: dict[str, CrossMoments] = {}

    def grab(name):
        def hook(m, inputs, out):
            acts[name] = out
        return hook

    view = mode_view(model)
    stream = iter(_inputs(data, batch_size))
    first = next(stream)
    pts = find_points(model, state_a, first[:2], points)
    with _hooks(view, {p.name: grab(p.name) for p in pts}):
        for xb in tqdm(itertools.chain([first], stream), desc="REPAIR endpoint stats", disable=not progress,
                       leave=False):
            functional_call(view, dict(state_a), (xb,))
            got_a = dict(acts)
            functional_call(view, dict(state_b), (xb,))
            for p in pts:
                a, b = got_a[p.name], acts[p.name]
                if p.name not in moments:
                    moments[p.name] = CrossMoments(a.shape[p.channel_dim], b.shape[p.channel_dim], device=a.device)
                moments[p.name].update(a, b, channel_dim=p.channel_dim)
    return pts, moments


@torch.no_grad()
def endpoint_stats(model: nn.Module, state_a: State, state_b: State, data, *,
                   points: Sequence[str] | None = None, batch_size: int = 1000,
                   progress: bool = False, group=None) -> EndpointStats:
    """Stream the two endpoint networks over `data` (inputs, or an (x, y) pair) and accumulate each
    repair point's per-channel moments with `CrossMoments` (float64, any number of batches).

    Under torch.distributed (`group`: None = the default group when initialised, a group, or False
    for this process alone) `data` is this rank's shard: the per-channel moments are summed over the
    ranks in one all-reduce of 8·Σ_points(1 + 4·n_ch) bytes (equal to one process on
    all the shards up to float64 rounding; the same on every rank)."""
    check_pair(model, state_a, state_b)
    require_reiterable(data, "statistics data")
    spread = is_distributed(group)
    pts, moments = _locally(spread, group, _endpoint_moments, model, state_a, state_b, data, points, batch_size,
                            progress)
    if spread:
        check_same([(p, tuple(moments[p.name].sum_xy.shape) if p.name in moments else None) for p in pts],
                   "endpoint_stats (repair points)", group)
        all_reduce_moments_([moments[p.name] for p in pts if p.name in moments], group, cross=False)
    for name, m in moments.items():
        if float(m.count) < 2:  # one value per channel: std 0, and REPAIR would zero the channel
            raise ValueError(f"REPAIR endpoint statistics of {name!r} rest on {int(m.count)} value per channel; "
                             "pass at least 2 samples (std of one value is 0)")
    return EndpointStats(pts, {n: m.mean_x for n, m in moments.items()}, {n: m.var_x.sqrt() for n, m in moments.items()},
                         {n: m.mean_y for n, m in moments.items()}, {n: m.var_y.sqrt() for n, m in moments.items()})


@torch.no_grad()
def renormalize(model: nn.Module, state: State, data, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor] | None],
                points: Sequence[RepairPoint], *, batch_size: int = 1000, eps: float = 1e-5,
                progress: bool = False, group=None) -> dict[str, torch.Tensor]:
    """A new state whose repair points output per-channel mean/std `targets[name]` on `data`.

    A target of None (BatchNorm points only) keeps the layer's own affine: that is RESET. The pass
    renormalises with batch statistics; their count-weighted average is folded into the state.
    Under torch.distributed (`group` as in `endpoint_stats`) `data` is this rank's shard and the
    averages are taken over all ranks' batches (one all-reduce of 8·Σ_points(1 + 2·n_ch) bytes).
    """
    check_state(model, state)
    eps = finite_float(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    view = mode_view(model)
    mods = dict(view.named_modules())
    sums: dict[str, list] = {p.name: [0, 0.0, 0.0] for p in points}  # count, Σ batch means, Σ batch vars

    def goal(p: RepairPoint, n_ch: int, like: torch.Tensor):
        tgt = targets.get(p.name)
        if tgt is not None:
            return tgt[1].to(like), tgt[0].to(like)
        w, b = state.get(f"{p.name}.weight"), state.get(f"{p.name}.bias")
        one = torch.ones(n_ch, dtype=like.dtype, device=like.device)
        return (one if w is None else w.to(like)), (one * 0 if b is None else b.to(like))

    def hook_for(p: RepairPoint):
        m = mods[p.name]
        e = m.eps if p.kind == "bn" else eps

        def hook(module, inputs, out):
            src = inputs[0] if p.kind == "bn" else out  # BN: renormalise its input, replacing its output
            mean, var = _channel_stats(src, p.channel_dim)
            n = src.numel() // src.shape[p.channel_dim]
            if n < 2:  # the variance of one value is 0: it would become running_var (or blow up the scale)
                raise ValueError(f"{p.name!r} sees {n} value per channel in a batch; renormalising needs >= 2 "
                                 "(pass batch_size >= 2 and at least 2 samples)")
            acc = sums[p.name]
            acc[0] += n
            acc[1] = acc[1] + mean.double() * n
            acc[2] = acc[2] + var.double() * n
            std_goal, mean_goal = goal(p, src.shape[p.channel_dim], src)
            shape = [1] * src.dim()
            shape[p.channel_dim] = -1
            scale = (std_goal / (var + e).sqrt()).view(shape)
            return (src - mean.view(shape)) * scale + mean_goal.view(shape)
        return hook

    for p in points:
        if p.kind == "bn" and targets.get(p.name) is not None and not mods[p.name].affine:
            raise ValueError(f"BatchNorm {p.name!r} has no affine parameters to fold REPAIR's targets into")
        if p.kind == "affine" and f"{p.name}.bias" not in state:
            raise ValueError(f"REPAIR cannot shift the channels of {p.name!r}: it has no bias")

    def run():
        with _hooks(view, {p.name: hook_for(p) for p in points}):
            for xb in tqdm(_inputs(data, batch_size), desc="renormalize", disable=not progress, leave=False):
                functional_call(view, dict(state), (xb,))
        for p in points:
            if sums[p.name][0] == 0:
                raise ValueError(f"repair point {p.name!r} never ran during the forward pass")

    spread = is_distributed(group)
    _locally(spread, group, run)
    if spread:
        check_same([(p, sums[p.name][1].shape) for p in points], "renormalize (repair points)", group)
        for acc in sums.values():
            acc[0] = torch.tensor(float(acc[0]), dtype=torch.float64, device=acc[1].device)
        all_reduce_sum_([t for acc in sums.values() for t in acc], group)
    out = {k: v.clone() for k, v in state.items()}
    for p in points:
        n, sm, sv = sums[p.name]
        mean, var = sm / n, sv / n
        tgt = targets.get(p.name)
        key = p.name + "."
        if p.kind == "bn":
            out[key + "running_mean"] = mean.to(out[key + "running_mean"])
            out[key + "running_var"] = var.to(out[key + "running_var"])
            if tgt is not None:
                out[key + "weight"] = tgt[1].to(out[key + "weight"])
                out[key + "bias"] = tgt[0].to(out[key + "bias"])
        else:
            std_goal, mean_goal = (tgt[1], tgt[0]) if tgt is not None else (torch.ones_like(mean), torch.zeros_like(mean))
            scale = std_goal.double() / (var + eps).sqrt()
            w = out[key + "weight"]
            out[key + "weight"] = (w.double() * scale.view([-1] + [1] * (w.dim() - 1))).to(w.dtype)
            b = out[key + "bias"]
            out[key + "bias"] = ((b.double() - mean) * scale + mean_goal.double()).to(b.dtype)
    return out


def repair(model: nn.Module, state_a: State, state_b: State, t: float, data, *,
           stats: EndpointStats | None = None, state: State | None = None, points: Sequence[str] | None = None,
           batch_size: int = 1000, eps: float = 1e-5, progress: bool = False, group=None) -> dict[str, torch.Tensor]:
    """REPAIR at t: the interpolated state (1−t)θ_A + tθ_B (or `state`) with every repair point's
    channels rescaled so that their mean and std on `data` are (1−t)μ_A + tμ_B and (1−t)σ_A + tσ_B.

    Pass `stats=endpoint_stats(...)` to reuse the endpoint statistics across many t. BatchNorm points
    are folded into running stats and affine; others into their conv/linear weight and bias (so LN and
    norm-free nets work too). Returns a new state dict; the model and inputs are untouched. Under
    torch.distributed `data` is this rank's shard (`group` as in `endpoint_stats`).
    """
    t = finite_float(t, "t")
    if stats is None:
        stats = endpoint_stats(model, state_a, state_b, data, points=points, batch_size=batch_size, progress=progress,
                               group=group)
    cur = lerp_state(state_a, state_b, t) if state is None else state
    return renormalize(model, cur, data, stats.targets(t), stats.points, batch_size=batch_size, eps=eps,
                       progress=progress, group=group)


def reset_bn(model: nn.Module, state: State, data, *, batch_size: int = 1000,
             progress: bool = False, group=None) -> dict[str, torch.Tensor]:
    """RESET: a new state whose BatchNorm running statistics are recomputed on `data`, as a train-mode
    pass with momentum=None would (each BN normalises with its batch statistics; the running stats
    become their count-weighted average, population variance). Weights are unchanged. Under
    torch.distributed `data` is this rank's shard (`group` as in `endpoint_stats`)."""
    check_state(model, state)
    points = [RepairPoint(n, "bn", 1) for n, m in model.named_modules() if isinstance(m, _BN)]
    if not points:
        raise ValueError(f"reset_bn: {type(model).__name__} has no BatchNorm layers to reset")
    for p in points:
        if f"{p.name}.running_mean" not in state:
            raise ValueError(f"reset_bn: BatchNorm {p.name!r} tracks no running statistics")
    return renormalize(model, state, data, {}, points, batch_size=batch_size, progress=progress, group=group)


class RepairCorrection:
    """REPAIR as a correction for the evaluator: `fix(state, t)` renormalises a path point to the
    endpoint statistics at t (collected once, here, on `data`). Needs the path position t."""

    def __init__(self, model: nn.Module, state_a: State, state_b: State, data, *, stats: EndpointStats | None = None,
                 points: Sequence[str] | None = None, batch_size: int = 1000, eps: float = 1e-5):
        require_reiterable(data, "statistics data")
        self.model, self.data, self.batch_size, self.eps = model, data, batch_size, finite_float(eps, "eps")
        # the evaluator splits the states among ranks, each on the whole data: statistics stay local
        self.stats = stats if stats is not None else endpoint_stats(model, state_a, state_b, data, points=points,
                                                                    batch_size=batch_size, group=False)

    def __call__(self, state: State, t: float | None) -> dict[str, torch.Tensor]:
        if t is None:
            raise ValueError("REPAIR needs the path position t of the state (its targets are (1−t)·μ_A + t·μ_B); "
                             "this state has none (a combination whose λ is not one global constant)")
        t = finite_float(t, "t")
        return renormalize(self.model, state, self.data, self.stats.targets(t), self.stats.points,
                           batch_size=self.batch_size, eps=self.eps, group=False)


class ResetCorrection:
    """RESET as a correction for the evaluator: `fix(state, t)` recomputes BatchNorm statistics on `data`.
    `batched`: whole chunks in one engine pass per batch (None: on GPUs only; on CPUs it measured
    0.9-1.2x the state-by-state loop, docs/perf-combine.md)."""

    def __init__(self, model: nn.Module, data, *, batch_size: int = 1000, batched: bool | None = None):
        require_reiterable(data, "statistics data")
        if not any(isinstance(m, _BN) for m in model.modules()):
            raise ValueError(f"reset_bn: {type(model).__name__} has no BatchNorm layers to reset")
        if batched not in (None, True, False):
            raise ValueError(f"batched={batched!r}; expected None, True or False")
        self.model, self.data, self.batch_size, self.mode, self.checked = model, data, batch_size, batched, None
        self.n_bn = sum(isinstance(m, _BN) for m in model.modules())

    def inputs(self):
        return _inputs(self.data, self.batch_size)

    def __call__(self, state: State, t: float | None = None) -> dict[str, torch.Tensor]:
        return reset_bn(self.model, state, self.data, batch_size=self.batch_size, group=False)

    def batched(self, forward, stacked: State, fixed: State) -> dict[str, torch.Tensor] | None:
        """The chunk's K stacked states with their statistics recomputed in one engine pass per batch,
        checked once against `reset_bn` on the first two (`_batched_stats.reset_chunk`); None: loop."""
        return reset_chunk(self, forward, stacked, fixed)
