"""Linear mode connectivity: loss/accuracy along θ(t) = (1−t)·θ_A + t·θ_B (through the one batched
evaluator, REPAIR/RESET plugged in as corrections), and the barrier family of those curves."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .batches import check_batch_size, splits
from .evaluation import Correction, Loss, PathPoints, evaluate
from .lm import perplexity
from .module_state import check_pair, lerp_state
from .repair import RepairCorrection, ResetCorrection

__all__ = ["Curve", "interpolate", "barrier", "lerp_state", "BARRIER_KINDS"]

State = Mapping[str, torch.Tensor]
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
        """One metric of one split ("loss", "accuracy", or "perplexity" = exp(loss), meaningful for a
        language model's mean next-token loss); `split` may be omitted when the curve has a single split."""
        if metric not in ("loss", "accuracy", "perplexity"):
            raise ValueError(f"metric={metric!r}; expected 'loss', 'accuracy' or 'perplexity'")
        if metric == "perplexity":
            return [perplexity(v) for v in self.values("loss", split)]
        table = self.loss if metric == "loss" else self.accuracy
        if split is None:
            if len(table) != 1:
                raise ValueError(f"curve has splits {sorted(table)}; pass split=")
            split = next(iter(table))
        if split not in table:
            raise ValueError(f"split {split!r} not in curve (has {sorted(table)})")
        return table[split]

    def perplexity(self, split: str | None = None) -> list[float]:
        """exp(loss) at every t: the perplexity of a language model's path (`values("perplexity")`)."""
        return self.values("perplexity", split)

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
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"curve has non-finite {metric} values {vals}; no barrier can be read from it")
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


# ---------------------------------------------------------------- curves
def _ts(ts) -> list[float]:
    if isinstance(ts, bool):
        raise TypeError(f"ts must be a point count or a list of floats, got {ts!r}")
    if isinstance(ts, int):
        if ts < 2:
            raise ValueError(f"ts={ts}: need at least 2 points")
        return [float(t) for t in torch.linspace(0, 1, ts, dtype=torch.float64)]
    out = [float(t) for t in ts]
    if not out or any(not math.isfinite(t) for t in out):
        raise ValueError(f"ts must be a point count or a non-empty list of finite floats, got {ts!r}")
    return out


def _default_chunk(state: State) -> int:
    numel = sum(v.numel() * v.element_size() for v in state.values())
    return max(1, min(16, (256 << 20) // max(numel, 1)))  # stacked copies stay under ~256 MB


def _stat_data(named: dict, stat_data):
    """RESET/REPAIR statistics data: `stat_data`, else the "train" split (else the first split)."""
    if stat_data is not None:
        return stat_data
    return named["train"] if "train" in named else next(iter(named.values()))


def interpolate(model: nn.Module, state_a: State, state_b: State, data, ts: int | Sequence[float] = 25, *,
                buffers: str = "interpolate", repair: bool = False, stat_data=None,
                correction: Correction | None = None, batch_size: int | None = 1000, chunk: int | None = None,
                vmap_ts: bool | None = None, loss: Loss | None = None, progress: bool = False,
                desc: str = "interpolate", group=None) -> Curve:
    """Loss and accuracy of θ(t) = (1−t)·θ_A + t·θ_B at every t (an int: that many evenly spaced
    points in [0, 1], endpoints included; or an explicit list). A point t is the combination
    λ = (1−t)·1 of `evaluate_combinations` (λ weights A); both run through `evaluation.evaluate`.

    data: an (x, y) pair, an iterable of (x, y) batches or a DataLoader (split "data"), or a dict of
    named ones, e.g. {"train": ..., "test": ...}. Corrections change each point before it is
    evaluated: buffers="reset" recomputes BatchNorm statistics on `stat_data` (RESET,
    `repair.ResetCorrection`), repair=True applies REPAIR (`repair.RepairCorrection`: endpoint
    statistics collected once), and `correction(state, t)` is any other (applied after those).
    stat_data (inputs, (x, y) or batches) defaults to the "train" split (else the first split). The
    model runs on a private eval-mode view (the caller's module and flags are never touched, from any
    thread); a Linear/activation chain runs `chunk` points at once; other models run one point after
    another on CPU (measured fastest there) and `chunk` at a time through the batched engine on a GPU
    or with `vmap_ts=True` (`batched_forward`). NaN/Inf in the states or inputs are refused.
    `loss(out, y) -> [K, B]` replaces cross-entropy (no accuracy then); a causal LM on token batches
    is scored by its next-token loss (`lm.NextTokenLoss`; `Curve.perplexity()`).
    Under torch.distributed every rank passes the same arguments and the points are split among the
    ranks (`group`: see `evaluation.evaluate`); every rank gets the single-process curve.
    """
    if buffers not in ("interpolate", "reset"):
        raise ValueError(f"buffers={buffers!r}; expected 'interpolate' or 'reset'")
    check_pair(model, state_a, state_b)
    check_batch_size(batch_size, allow_none=True)   # None: every row of an (x, y) pair at once
    check_batch_size(chunk, "chunk", allow_none=True)
    named = splits(data)
    tlist = _ts(ts)
    fixes: list = []
    if repair:
        fixes.append(RepairCorrection(model, state_a, state_b, _stat_data(named, stat_data), batch_size=batch_size))
    elif buffers == "reset":
        fixes.append(ResetCorrection(model, _stat_data(named, stat_data), batch_size=batch_size))
    if correction is not None:
        fixes.append(correction)
    fix = None
    if fixes:
        def fix(state, t):
            for f in fixes:
                state = f(state, t)
            return state
    r = evaluate(model, PathPoints(state_a, state_b, tlist), named, chunk=chunk or _default_chunk(state_a),
                 batch_size=batch_size, loss=loss, correction=fix, use_vmap=bool(vmap_ts), progress=progress,
                 desc=desc, group=group)
    meta = {"buffers": buffers, "repair": bool(repair)}
    acc = r.accuracy or {}
    return Curve(tlist, {s: v.tolist() for s, v in r.loss.items()}, {s: v.tolist() for s, v in acc.items()}, meta)
