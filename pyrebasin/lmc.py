"""Linear mode connectivity: loss/accuracy along θ(t) = (1−t)·θ_A + t·θ_B, and loss barriers.

Models run only through `torch.func.functional_call` (optionally several t at once under `torch.func.vmap`).
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from .module_state import check_pair, lerp_state

__all__ = ["Curve", "interpolate", "barrier", "eval_mode", "BARRIER_KINDS"]

State = Mapping[str, torch.Tensor]
Split = tuple[torch.Tensor, torch.Tensor]
BARRIER_KINDS = ("endpoint_mean", "linear", "any_chord")


@dataclass
class Curve:
    """Loss and accuracy at every t of an interpolation path, per data split.

    `loss[split][i]` and `accuracy[split][i]` belong to `ts[i]`; `meta` holds plain-JSON notes
    (buffers mode, REPAIR, labels) for reports.
    """

    ts: list[float]
    loss: dict[str, list[float]]
    accuracy: dict[str, list[float]]
    meta: dict = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return list(self.loss)

    def values(self, metric: str = "loss", split: str | None = None) -> list[float]:
        """One metric of one split; `split` may be omitted when the curve has a single split."""
        if metric not in ("loss", "accuracy"):
            raise ValueError(f"metric={metric!r}; expected 'loss' or 'accuracy'")
        table = self.loss if metric == "loss" else self.accuracy
        if split is None:
            if len(table) != 1:
                raise ValueError(f"curve has splits {sorted(table)}; pass split=")
            split = next(iter(table))
        if split not in table:
            raise ValueError(f"split {split!r} not in curve (has {sorted(table)})")
        return table[split]

    def to_dict(self) -> dict:
        return {"ts": list(self.ts), "loss": {k: list(v) for k, v in self.loss.items()},
                "accuracy": {k: list(v) for k, v in self.accuracy.items()}, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Curve":
        return cls([float(t) for t in d["ts"]], {k: [float(x) for x in v] for k, v in d["loss"].items()},
                   {k: [float(x) for x in v] for k, v in d["accuracy"].items()}, dict(d.get("meta", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Curve":
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------- barriers
def _lower_hull_values(ts: Sequence[float], vs: Sequence[float]) -> list[float]:
    """The lower convex envelope of the points (ts[i], vs[i]) evaluated at every ts[i]."""
    hull: list[int] = []
    for i in range(len(ts)):  # monotone chain over points sorted by t
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = (ts[a] - ts[o]) * (vs[i] - vs[o]) - (vs[a] - vs[o]) * (ts[i] - ts[o])
            if cross <= 0:  # a lies on or above the segment o -> i: not on the lower hull
                hull.pop()
            else:
                break
        hull.append(i)
    out, h = [], 0
    for i in range(len(ts)):
        while h + 1 < len(hull) - 1 and ts[hull[h + 1]] <= ts[i]:
            h += 1
        lo, hi = hull[h], hull[min(h + 1, len(hull) - 1)]
        if hi == lo or ts[hi] == ts[lo]:
            out.append(vs[lo])
        else:
            out.append(vs[lo] + (ts[i] - ts[lo]) / (ts[hi] - ts[lo]) * (vs[hi] - vs[lo]))
    return out


def barrier(curve: Curve, metric: str = "loss", kind: str = "endpoint_mean", *, split: str | None = None) -> float:
    """The barrier of an interpolation curve. With L(t) the loss along the path:

    - ``"endpoint_mean"`` (Git Re-Basin, Ainsworth et al. 2023): max_t L(t) − ½(L(0) + L(1)).
    - ``"linear"`` (Frankle et al. 2020; Entezari et al. 2022): max_t [L(t) − ((1−t)L(0) + tL(1))],
      the largest rise above the straight line joining the endpoints.
    - ``"any_chord"`` (Juneja et al. 2023): the largest rise of the curve above *any* chord joining
      two of its points, clipped at 0 — the gap between the curve and its lower convex envelope. It
      is 0 exactly when the sampled curve is convex; unlike the others it ignores a monotone
      slope between unequal endpoints and catches bumps that stay below the endpoint chord.

    For ``metric="accuracy"`` the sign flips (a barrier is a *drop* in accuracy): endpoint_mean is
    ½(A(0)+A(1)) − min_t A(t), linear is the largest fall below the endpoint line, any_chord the
    largest fall below any chord. endpoint_mean and linear need ts[0] == 0 and ts[-1] == 1; they are
    ≥ 0 by construction because the endpoints are on the curve.
    """
    if kind not in BARRIER_KINDS:
        raise ValueError(f"barrier kind={kind!r}; expected one of {list(BARRIER_KINDS)}")
    vals = [float(v) for v in curve.values(metric, split)]
    ts = [float(t) for t in curve.ts]
    if len(ts) != len(vals) or len(ts) < 2:
        raise ValueError(f"curve needs >= 2 points with one value each (got {len(ts)} ts, {len(vals)} values)")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"curve ts must be strictly increasing, got {ts}")
    if metric == "accuracy":
        vals = [-v for v in vals]  # a fall in accuracy is a rise in -accuracy
    if kind == "any_chord":
        hull = _lower_hull_values(ts, vals)
        return max(0.0, max(v - h for v, h in zip(vals, hull)))
    if ts[0] != 0.0 or ts[-1] != 1.0:
        raise ValueError(f"barrier kind={kind!r} needs the endpoints t=0 and t=1 first and last; got "
                         f"ts[0]={ts[0]}, ts[-1]={ts[-1]}")
    v0, v1 = vals[0], vals[-1]
    if kind == "endpoint_mean":
        return max(vals) - 0.5 * (v0 + v1)
    return max(v - ((1 - t) * v0 + t * v1) for t, v in zip(ts, vals))


# ---------------------------------------------------------------- states and models
@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run `model` in eval mode for a block and restore every submodule's own flag afterwards.

    The flag lives on the module, and functional_call reads it, so this is the one attribute a
    function here flips (temporarily; not thread-safe for one module shared across threads)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


def _splits(data) -> dict[str, Split]:
    if isinstance(data, Mapping):
        out = dict(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        out = {"data": tuple(data)}
    else:
        raise TypeError("data must be an (x, y) pair of tensors or a dict of named (x, y) splits, "
                        f"got {type(data).__name__}")
    if not out:
        raise ValueError("data has no splits")
    for name, xy in out.items():
        if not (isinstance(xy, (tuple, list)) and len(xy) == 2 and all(isinstance(t, torch.Tensor) for t in xy)):
            raise TypeError(f"data split {name!r} must be an (x, y) pair of tensors")
        x, y = xy
        if x.shape[0] != y.shape[0] or y.dim() != 1:
            raise ValueError(f"data split {name!r}: x has {x.shape[0]} rows but y has shape {list(y.shape)} "
                             "(expected 1-D labels, one per row)")
        if x.shape[0] == 0:
            raise ValueError(f"data split {name!r} is empty")
    return {k: (x, y) for k, (x, y) in out.items()}


def _ts(ts) -> list[float]:
    if isinstance(ts, int):
        if ts < 2:
            raise ValueError(f"ts={ts}: need at least 2 points")
        return [float(t) for t in torch.linspace(0, 1, ts, dtype=torch.float64)]
    out = [float(t) for t in ts]
    if not out or any(not math.isfinite(t) for t in out):
        raise ValueError(f"ts must be a point count or a non-empty list of finite floats, got {ts!r}")
    return out


@torch.no_grad()
def _evaluate(model: nn.Module, states: list[dict[str, torch.Tensor]], splits: dict[str, Split],
              batch_size: int, use_vmap: bool) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Mean cross-entropy and accuracy of each state on each split (states stacked under vmap, or
    one at a time)."""
    if use_vmap and len(states) > 1:
        batched = [k for k in states[0] if states[0][k].is_floating_point()]
        fixed = {k: v for k, v in states[0].items() if k not in batched}
        stacked = {k: torch.stack([s[k] for s in states]) for k in batched}
        run = vmap(lambda p, x: functional_call(model, (p, fixed), (x,)), in_dims=(0, None))
        forward = lambda x: run(stacked, x)  # noqa: E731
    else:
        forward = lambda x: torch.stack([functional_call(model, s, (x,)) for s in states])  # noqa: E731
    losses: list[dict[str, float]] = [{} for _ in states]
    accs: list[dict[str, float]] = [{} for _ in states]
    for split, (x, y) in splits.items():
        ce_sum = torch.zeros(len(states), dtype=torch.float64)
        hits = torch.zeros(len(states), dtype=torch.long)
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            logits = forward(xb)
            if logits.dim() != 3 or logits.shape[1] != len(yb):
                raise ValueError(f"model output has shape {list(logits.shape[1:])} for a batch of {len(yb)}; "
                                 "expected [batch, classes] logits")
            _check_labels(yb, logits.shape[-1], split)
            ce = nn.functional.cross_entropy(logits.flatten(0, 1).float(), yb.repeat(len(states)), reduction="none")
            ce_sum += ce.view(len(states), -1).sum(1).double().cpu()
            hits += (logits.argmax(-1) == yb).sum(1).cpu()
        for j in range(len(states)):
            losses[j][split] = float(ce_sum[j]) / len(y)
            accs[j][split] = int(hits[j]) / len(y)
    return losses, accs


def _check_labels(y: torch.Tensor, classes: int, split: str) -> None:
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"split {split!r}: labels must be integer class indices, got {y.dtype}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"split {split!r}: labels must lie in [0, {classes}) (the model has {classes} "
                         f"outputs), got range [{int(y.min())}, {int(y.max())}]")


def _default_chunk(state: State) -> int:
    numel = sum(v.numel() * v.element_size() for v in state.values())
    return max(1, min(16, (256 << 20) // max(numel, 1)))  # stacked copies stay under ~256 MB


def interpolate(model: nn.Module, state_a: State, state_b: State, data, ts: int | Sequence[float] = 25, *,
                buffers: str = "interpolate", repair: bool = False, stat_data: torch.Tensor | None = None,
                batch_size: int = 1000, chunk: int | None = None, vmap_ts: bool | None = None,
                transform: Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]] | None = None,
                progress: bool = False, desc: str = "interpolate") -> Curve:
    """Loss and accuracy of θ(t) = (1−t)·θ_A + t·θ_B at every t (an int: that many evenly spaced
    points in [0, 1], endpoints included; or an explicit list).

    data: an (x, y) pair (split "data") or a dict of named (x, y) splits, e.g. {"train": ..., "test": ...}.
    buffers: "interpolate" lerps BatchNorm running stats like the weights; "reset" recomputes them
    for every t on `stat_data` (RESET, see `reset_bn`). repair=True applies REPAIR at every t (the
    endpoint statistics are collected once, on `stat_data`); it sets BatchNorm statistics itself.
    stat_data defaults to the "train" split's x (else the first split's). `transform(state, t)` may
    change each state before evaluation (e.g. a custom correction). The model runs in eval mode via
    functional_call, one t after another; `vmap_ts=True` stacks `chunk` values of t under
    torch.func.vmap instead (slower on CPU as measured; may pay on a GPU for small models). Inputs
    are never modified.
    """
    if buffers not in ("interpolate", "reset"):
        raise ValueError(f"buffers={buffers!r}; expected 'interpolate' or 'reset'")
    check_pair(model, state_a, state_b)
    splits = _splits(data)
    tlist = _ts(ts)
    if stat_data is None and (buffers == "reset" or repair):
        stat_data = (splits["train"] if "train" in splits else next(iter(splits.values())))[0]
    stats = None
    if repair:
        from .repair import endpoint_stats  # repair builds on this module
        stats = endpoint_stats(model, state_a, state_b, stat_data, batch_size=batch_size)
    chunk = chunk or _default_chunk(state_a)
    if vmap_ts is None:  # measured (benchmarks/lmc_ratios.py): on CPU vmap took 0.8-10x the loop's time
        vmap_ts = False
    losses: list[dict[str, float]] = []
    accs: list[dict[str, float]] = []
    with eval_mode(model), tqdm(total=len(tlist), desc=desc, disable=not progress, leave=False) as bar:
        for i in range(0, len(tlist), chunk):
            states = []
            for t in tlist[i:i + chunk]:
                s = lerp_state(state_a, state_b, t)
                if repair:
                    from .repair import repair as _repair
                    s = _repair(model, state_a, state_b, t, stat_data, stats=stats, state=s, batch_size=batch_size)
                elif buffers == "reset":
                    from .repair import reset_bn
                    s = reset_bn(model, s, stat_data, batch_size=batch_size)
                if transform is not None:
                    s = transform(s, t)
                states.append(s)
            lo, ac = _evaluate(model, states, splits, batch_size, vmap_ts)
            losses += lo
            accs += ac
            bar.update(len(states))
    meta = {"buffers": buffers, "repair": bool(repair)}
    return Curve(tlist, {s: [d[s] for d in losses] for s in splits}, {s: [d[s] for d in accs] for s in splits}, meta)
