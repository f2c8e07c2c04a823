"""Connectivity of N models (Juneja et al. 2023): the N×N matrix of pairwise interpolation barriers
(naive or after alignment), spectral clustering of it, and the 2-D loss plane through three models.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .combine import evaluate_combinations
from .distributed import split_map
from .lmc import BARRIER_KINDS, Curve, barrier
from .matching import activation_matching, weight_matching
from .merging import merge_many
from .spec import PermutationSpec, apply_permutation

__all__ = ["ALIGNMENTS", "LossPlane", "affinity", "loss_plane", "mean_offdiagonal", "pairwise_barriers",
           "spectral_clusters"]

State = Mapping[str, torch.Tensor]
ALIGNMENTS = (None, "weight", "activation", "merge")


def _inputs(data):
    """What activation matching reads: x of an (x, y) pair, else the iterable of (x, y) batches itself."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0]
    if isinstance(data, (Mapping, torch.Tensor)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be an (x, y) pair of tensors or an iterable of (x, y) batches, "
                        f"got {type(data).__name__}")
    return data


def _example(x) -> torch.Tensor:
    return x[:2] if isinstance(x, torch.Tensor) else next(iter(x))[0][:2]


def _spec_of(model: nn.Module, spec: PermutationSpec | None, x: torch.Tensor) -> PermutationSpec:
    if spec is not None:
        return spec
    if callable(getattr(model, "permutation_spec", None)):
        return model.permutation_spec()
    from .trace import trace_spec
    return trace_spec(model, _example(x))


def _aligned_pair(model, spec, align, states, i, j, x, options, merged):
    """State j aligned to state i (i < j) by the chosen method (in this process alone)."""
    if align is None:
        return states[j]
    if align == "merge":
        return apply_permutation(spec, merged[i, j], states[j])
    if align == "weight":
        perms = weight_matching(spec, states[i], states[j], **{**options, "group": False}).perms
    else:
        # activation_matching runs a train-mode model on a private eval-mode view: no flag to restore
        perms = activation_matching(model, model, spec, x, state_a=states[i], state_b=states[j],
                                    **{**options, "group": False}).perms
    return apply_permutation(spec, perms, states[j])


def pairwise_barriers(model: nn.Module, states: Sequence[State], data, *, ts: int | Sequence[float] = 11,
                      kinds: Sequence[str] = BARRIER_KINDS, metric: str = "loss", align: str | None = None,
                      spec: PermutationSpec | None = None, match_options: Mapping | None = None,
                      batch_size: int | None = 1000, progress: bool = False, group=None
                      ) -> tuple[dict[str, torch.Tensor], dict[tuple[int, int], Curve]]:
    """barriers[kind][i, j] for every pair (symmetric, diagonal 0) and the curve of each pair i < j.

    Each pair's curve is one batched `evaluate_combinations` call over the λ = t·1 of every t. align:
    None (naive), "weight" / "activation" (match j to i, per pair), "merge" (one `merge_many` shared
    space: cycle-consistent pairwise maps). `spec` defaults to `model.permutation_spec()` or
    `trace_spec`; `match_options` go to the matcher. `data`: an (x, y) pair or an iterable of (x, y)
    batches (activation matching reads their x). Inputs are never modified. Under torch.distributed
    (`group`: None = the default group when initialised, a group, or False for this process alone)
    every rank passes the same arguments; the pairs are split among the ranks and the curves gathered
    (identical to one process on every rank).
    """
    if isinstance(states, Mapping) or not isinstance(states, Sequence) or len(states) < 2:
        raise ValueError("states must be a list of at least 2 state dicts")
    bad = [k for k in kinds if k not in BARRIER_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds={list(kinds)!r}; expected a non-empty subset of {list(BARRIER_KINDS)}")
    if align not in ALIGNMENTS:
        raise ValueError(f"align={align!r}; expected one of {list(ALIGNMENTS)}")
    x = _inputs(data)
    if x is data:
        data = x = list(data)  # read once per pair: a generator would be spent after the first
    tlist = [float(t) for t in torch.linspace(0, 1, ts, dtype=torch.float64)] if isinstance(ts, int) else \
        [float(t) for t in ts]
    if len(tlist) < 2 or tlist[0] != 0.0 or tlist[-1] != 1.0:
        raise ValueError(f"ts must include t=0 first and t=1 last (at least 2 points), got {ts!r}")
    options = dict(match_options or {})
    if align is not None:
        spec = _spec_of(model, spec, x)
    # every rank runs merge_many alike (its weight matchings split over `group`)
    merged = merge_many(spec, list(states), matching={**options, "group": group}).pairwise() if align == "merge" else None
    n = len(states)
    out = {k: torch.zeros(n, n, dtype=torch.float64) for k in kinds}
    curves: dict[tuple[int, int], Curve] = {}
    pairs = list(itertools.combinations(range(n), 2))

    def curve_of(pair):
        i, j = pair
        b = _aligned_pair(model, spec, align, states, i, j, x, options, merged)
        # θ_B + λ(θ_A − θ_B) with A = state j, B = state i: λ = t walks from model i to model j
        res = evaluate_combinations(model, b, states[i], tlist, data, chunk=len(tlist), batch_size=batch_size,
                                    group=False)
        return Curve(tlist, {"data": res.loss.tolist()}, {"data": res.accuracy.tolist()},
                     {"pair": [i, j], "align": align})

    for (i, j), curve in zip(pairs, split_map(curve_of, pairs, group=group, desc="connectivity", progress=progress,
                                              agree=(n, tlist, list(kinds), metric, align))):
        curves[i, j] = curve
        for k in kinds:
            out[k][i, j] = out[k][j, i] = barrier(curve, metric, k)
    return out, curves


def mean_offdiagonal(m: torch.Tensor) -> float:
    """The mean of an N×N pairwise matrix over its N·(N−1) off-diagonal entries (diagonal zero)."""
    n = len(m)
    return float(m.sum() / (n * (n - 1)))


def affinity(distances: torch.Tensor, delta: float | None = None) -> tuple[torch.Tensor, float]:
    """exp(−D²/2δ²) and the δ used (default: the median off-diagonal distance; 1 if that is 0)."""
    d = torch.as_tensor(distances, dtype=torch.float64)
    if d.dim() != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances must be a square matrix, got shape {list(d.shape)}")
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError("distances must be finite and non-negative")
    d = 0.5 * (d + d.T)
    if delta is None:
        off = d[~torch.eye(len(d), dtype=torch.bool)]
        delta = float(off.median()) if off.numel() else 1.0
        delta = delta if delta > 0 else 1.0
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    return torch.exp(-d.pow(2) / (2 * delta ** 2)), float(delta)


def _eigengap(aff: torch.Tensor) -> int:
    """The cluster count k in [2, N−1] with the largest gap λ_{k+1} − λ_k of the normalised Laplacian.

    k = 1 is left out: with δ the median distance, the first gap is the largest even for clear
    blocks (the spectrum of a 3-block example: 0, 0.80, 0.86, 1.00, ...)."""
    deg = aff.sum(1)
    inv = deg.clamp_min(1e-300).rsqrt()
    lap = torch.eye(len(aff), dtype=torch.float64) - inv[:, None] * aff * inv[None, :]
    ev = torch.linalg.eigvalsh(lap)
    gaps = ev[2:] - ev[1:-1]          # gaps[k - 2] = λ_{k+1} − λ_k, k = 2 .. N−1
    return int(gaps.argmax()) + 2


def spectral_clusters(distances: torch.Tensor, *, n_clusters: int | None = None, delta: float | None = None,
                      seed: int = 0) -> dict:
    """Spectral clustering (scikit-learn) of models on the affinity exp(−D²/2δ²) of a distance matrix.

    n_clusters: given, or chosen by the largest eigengap of the normalised Laplacian among 2..N−1
    clusters (1 when every off-diagonal distance is equal; pass n_clusters=1 to keep one). Labels are
    renumbered by first appearance (model 0 is in cluster 0). Returns {"labels", "n_clusters",
    "delta", "chosen_by"}.
    """
    aff, delta = affinity(distances, delta)
    n = len(aff)
    chosen_by = "given"
    if n_clusters is None:
        off = aff[~torch.eye(n, dtype=torch.bool)]
        flat = n <= 2 or float(off.max() - off.min()) <= 1e-12
        n_clusters, chosen_by = (1 if flat else _eigengap(aff)), "eigengap"
    if not 1 <= int(n_clusters) <= n:
        raise ValueError(f"n_clusters must lie in [1, {n}], got {n_clusters}")
    n_clusters = int(n_clusters)
    if n_clusters == 1:
        raw = [0] * n
    elif n_clusters == n:
        raw = list(range(n))
    else:
        try:
            from sklearn.cluster import SpectralClustering
        except ImportError as exc:  # an optional dependency: the maps extra
            raise ImportError("spectral_clusters needs scikit-learn: pip install 'pyrebasin[maps]'") from exc
        sc = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed,
                                assign_labels="cluster_qr")
        raw = [int(v) for v in sc.fit_predict(aff.numpy())]
    order: dict[int, int] = {}
    labels = [order.setdefault(r, len(order)) for r in raw]
    return {"labels": labels, "n_clusters": n_clusters, "delta": delta, "chosen_by": chosen_by}


@dataclass
class LossPlane:
    """Loss and accuracy of θ_A + u(θ_B − θ_A) + v(θ_C − θ_A): `loss[iv][iu]` belongs to (us[iu], vs[iv]);
    A sits at (0, 0), B at (1, 0), C at (0, 1)."""

    us: list[float]
    vs: list[float]
    loss: torch.Tensor
    accuracy: torch.Tensor
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"us": list(self.us), "vs": list(self.vs), "loss": self.loss.tolist(),
                "accuracy": self.accuracy.tolist(), "meta": dict(self.meta)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _grid(grid) -> tuple[list[float], list[float]]:
    if isinstance(grid, int):
        if grid < 2:
            raise ValueError(f"grid={grid}: need at least 2 points per axis")
        axis = [float(t) for t in torch.linspace(-0.25, 1.25, grid, dtype=torch.float64)]
        return axis, list(axis)
    if isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(g, Sequence) for g in grid):
        us, vs = ([float(t) for t in g] for g in grid)
    elif isinstance(grid, Sequence):
        us = vs = [float(t) for t in grid]
    else:
        raise TypeError(f"grid must be a point count, a list of values or a (us, vs) pair, got {grid!r}")
    if len(us) < 2 or len(vs) < 2:
        raise ValueError(f"grid needs at least 2 values per axis, got {len(us)} and {len(vs)}")
    return us, list(vs)


def loss_plane(model: nn.Module, state_a: State, state_b: State, state_c: State, data, *, grid=13,
               batch_size: int | None = 1000, progress: bool = False, group=None) -> LossPlane:
    """Loss and accuracy over the plane through three models, θ_A + u(θ_B − θ_A) + v(θ_C − θ_A).

    grid: a point count per axis (on [−0.25, 1.25]), one list of values for both axes, or (us, vs).
    Each row v is one batched `evaluate_combinations` call over its us (base θ_A + v(θ_C − θ_A),
    direction θ_B − θ_A). Non-float buffers come from A; inputs are never modified. Under
    torch.distributed (`group` as in `pairwise_barriers`) the rows are split among the ranks.
    """
    us, vs = _grid(grid)
    for name, s in (("state_b", state_b), ("state_c", state_c)):
        if set(s) != set(state_a):
            raise ValueError(f"{name} has other keys than state_a: {sorted(set(s) ^ set(state_a))[:8]}")
        for k, v in s.items():
            if v.shape != state_a[k].shape:
                raise ValueError(f"{name}[{k!r}] has shape {list(v.shape)} but state_a's is {list(state_a[k].shape)}")
    floats = [k for k, v in state_a.items() if v.is_floating_point()]

    def row(v):
        base = dict(state_a)
        head = dict(state_a)
        for k in floats:
            a = state_a[k]
            base[k] = a + v * (state_c[k] - a)
            head[k] = base[k] + (state_b[k] - a)
        res = evaluate_combinations(model, head, base, us, data, chunk=len(us), batch_size=batch_size, group=False)
        return res.loss, res.accuracy

    rows = split_map(row, vs, group=group, desc="loss plane", progress=progress, agree=(us, vs))
    loss = torch.stack([r[0] for r in rows])
    acc = torch.stack([r[1] for r in rows])
    return LossPlane(us, vs, loss, acc, {"origin": "A", "u": "B - A", "v": "C - A"})
