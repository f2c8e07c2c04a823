"""Connectivity maps of N models (Juneja et al. 2023): the barrier matrices, their spectral clusters,
JSON, a heatmap ordered by cluster, and the contour plot of the loss plane through three models.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..fileio import atomic_write_text
from ..lmc import BARRIER_KINDS
from ..maps import LossPlane, pairwise_barriers, spectral_clusters
from .plots import figure, save_figure

__all__ = ["ConnectivityMap", "connectivity_map", "plot_connectivity_map", "plot_loss_plane"]


@dataclass
class ConnectivityMap:
    """`barriers[kind]`: N×N float64 tensor (symmetric, diagonal 0) of pairwise barriers; `clusters`:
    one label per model from spectral clustering of `barriers[cluster_kind]`; `curves`: each pair's
    curve as plain data ("i-j" -> Curve.to_dict())."""

    barriers: dict[str, torch.Tensor]
    clusters: list[int]
    cluster_kind: str
    n_clusters: int
    delta: float
    metric: str = "loss"
    align: str | None = None
    ts: list[float] = field(default_factory=list)
    curves: dict[str, dict] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    @property
    def order(self) -> list[int]:
        """Models sorted by cluster (stable within a cluster): the heatmap's row order."""
        return sorted(range(len(self.clusters)), key=lambda i: (self.clusters[i], i))

    def to_dict(self) -> dict:
        return {"barriers": {k: v.tolist() for k, v in self.barriers.items()}, "clusters": list(self.clusters),
                "cluster_kind": self.cluster_kind, "n_clusters": self.n_clusters, "delta": self.delta,
                "metric": self.metric, "align": self.align, "ts": list(self.ts), "names": list(self.names),
                "curves": dict(self.curves)}

    def to_json(self, path: str | Path | None = None) -> str:
        """The map as JSON text (also written atomically to `path` when given)."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping) -> ConnectivityMap:
        return cls({k: torch.tensor(v, dtype=torch.float64) for k, v in d["barriers"].items()}, list(d["clusters"]),
                   d["cluster_kind"], int(d["n_clusters"]), float(d["delta"]), d.get("metric", "loss"),
                   d.get("align"), list(d.get("ts", [])), dict(d.get("curves", {})), list(d.get("names", [])))

    def plot(self, path: str | Path, *, kind: str | None = None, title: str = "") -> Path:
        """Heatmap of `barriers[kind]` (default: the clustered kind), rows and columns ordered by cluster."""
        return plot_connectivity_map(self, path, kind=kind, title=title)


def connectivity_map(model, states: Sequence[Mapping[str, torch.Tensor]], data, *, ts: int | Sequence[float] = 11,
                     align: str | None = None, kinds: Sequence[str] = BARRIER_KINDS, metric: str = "loss",
                     cluster_kind: str | None = None, n_clusters: int | None = None, delta: float | None = None,
                     spec=None, match_options: Mapping | None = None, names: Sequence[str] | None = None,
                     seed: int = 0, batch_size: int | None = 1000, progress: bool = False) -> ConnectivityMap:
    """The connectivity map of N models sharing one architecture (`model` is the template that runs them).

    align: None (naive), "weight", "activation" (each pair j matched to i) or "merge" (one MergeMany
    space). kinds: barrier kinds of `prb.barrier` ("any_chord" is Juneja et al.'s largest rise above
    the chord of any sub-segment). The clusters come from `cluster_kind` (default: "any_chord" when
    computed, else the first kind) by spectral clustering on exp(−D²/2δ²) (δ: median off-diagonal
    barrier by default; `n_clusters` given or chosen by eigengap). See `prb.maps.pairwise_barriers`.
    """
    kinds = list(kinds)
    cluster_kind = cluster_kind or ("any_chord" if "any_chord" in kinds else (kinds[0] if kinds else None))
    if cluster_kind not in kinds:
        raise ValueError(f"cluster_kind={cluster_kind!r} is not among kinds={kinds}")
    if names is not None and len(names) != len(states):
        raise ValueError(f"names has {len(names)} entries for {len(states)} states")
    barriers, curves = pairwise_barriers(model, states, data, ts=ts, kinds=kinds, metric=metric, align=align,
                                         spec=spec, match_options=match_options, batch_size=batch_size,
                                         progress=progress)
    cl = spectral_clusters(barriers[cluster_kind].clamp_min(0), n_clusters=n_clusters, delta=delta, seed=seed)
    first = next(iter(curves.values()))
    return ConnectivityMap(barriers, cl["labels"], cluster_kind, cl["n_clusters"], cl["delta"], metric, align,
                           list(first.ts), {f"{i}-{j}": c.to_dict() for (i, j), c in curves.items()},
                           list(names) if names is not None else [str(i) for i in range(len(states))])


def plot_connectivity_map(cmap: ConnectivityMap, path: str | Path, *, kind: str | None = None,
                          title: str = "") -> Path:
    """The barrier heatmap ordered by cluster, with cluster boundaries drawn, written atomically as PNG."""
    kind = kind or cmap.cluster_kind
    if kind not in cmap.barriers:
        raise ValueError(f"kind={kind!r} not in the map (has {sorted(cmap.barriers)})")
    order = cmap.order
    m = cmap.barriers[kind][order][:, order]
    n = len(order)
    fig = figure(figsize=(2.4 + 0.42 * n, 1.8 + 0.38 * n))
    ax = fig.subplots()
    im = ax.imshow(m.numpy(), cmap="viridis", vmin=0)
    labels = [f"{cmap.names[i]} (c{cmap.clusters[i]})" for i in order]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    for b in range(1, n):
        if cmap.clusters[order[b]] != cmap.clusters[order[b - 1]]:
            ax.axhline(b - 0.5, color="white", linewidth=1.5)
            ax.axvline(b - 0.5, color="white", linewidth=1.5)
    if n <= 12:
        for r in range(n):
            for c in range(n):
                ax.annotate(f"{float(m[r, c]):.2f}", (c, r), ha="center", va="center", fontsize=6,
                            color="white" if float(m[r, c]) < 0.6 * float(m.max() or 1) else "black")
    fig.colorbar(im, ax=ax, label=f"{kind} {cmap.metric} barrier")
    ax.set_title(title or f"{kind} barriers ({cmap.align or 'naive'}), {cmap.n_clusters} clusters", fontsize=9)
    return save_figure(fig, path)


def plot_loss_plane(plane: LossPlane, path: str | Path, *, metric: str = "loss", title: str = "",
                    labels: Sequence[str] = ("A", "B", "C")) -> Path:
    """Contour plot of the plane through three models (A at (0, 0), B at (1, 0), C at (0, 1)), PNG."""
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric={metric!r}; expected 'loss' or 'accuracy'")
    z = (plane.loss if metric == "loss" else plane.accuracy).numpy()
    fig = figure(figsize=(5.2, 4.4))
    ax = fig.subplots()
    cs = ax.contourf(plane.us, plane.vs, z, levels=20, cmap="viridis_r" if metric == "loss" else "viridis")
    ax.contour(plane.us, plane.vs, z, levels=10, colors="k", linewidths=0.4, alpha=0.5)
    fig.colorbar(cs, ax=ax, label=metric)
    for (u, v), name in zip(((0, 0), (1, 0), (0, 1)), labels):
        ax.plot([u], [v], "o", color="white", markeredgecolor="black")
        ax.annotate(name, (u, v), textcoords="offset points", xytext=(5, 5), color="white", fontsize=9)
    ax.set_xlabel("u  (θ_B − θ_A)")
    ax.set_ylabel("v  (θ_C − θ_A)")
    ax.set_title(title or f"{metric} on the plane through three models", fontsize=9)
    return save_figure(fig, path)
