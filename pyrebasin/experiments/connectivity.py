"""Connectivity maps of N models (Juneja et al. 2023): the barrier matrices, their spectral clusters,
JSON, a heatmap ordered by cluster, and the contour plot of the loss plane through three models.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..fileio import atomic_write_text
from ..lmc import BARRIER_KINDS
from ..maps import LossPlane, loss_plane, mean_offdiagonal, pairwise_barriers, spectral_clusters
from .plots import figure, save_figure

__all__ = ["ConnectivityMap", "connectivity_map", "connectivity_section", "merge_section", "plot_connectivity_map",
           "plot_loss_plane"]


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
                     seed: int = 0, batch_size: int | None = 1000, progress: bool = False,
                     group=None) -> ConnectivityMap:
    """The connectivity map of N models sharing one architecture (`model` is the template that runs them).

    align: None (naive), "weight", "activation" (each pair j matched to i) or "merge" (one MergeMany
    space). kinds: barrier kinds of `prb.barrier` ("any_chord" is Juneja et al.'s largest rise above
    the chord of any sub-segment). The clusters come from `cluster_kind` (default: "any_chord" when
    computed, else the first kind) by spectral clustering on exp(−D²/2δ²) (δ: median off-diagonal
    barrier by default; `n_clusters` given or chosen by eigengap). See `prb.maps.pairwise_barriers`.
    Under torch.distributed (`group`) the pairs are split among the ranks; every rank gets the map.
    """
    kinds = list(kinds)
    cluster_kind = cluster_kind or ("any_chord" if "any_chord" in kinds else (kinds[0] if kinds else None))
    if cluster_kind not in kinds:
        raise ValueError(f"cluster_kind={cluster_kind!r} is not among kinds={kinds}")
    if names is not None and len(names) != len(states):
        raise ValueError(f"names has {len(names)} entries for {len(states)} states")
    barriers, curves = pairwise_barriers(model, states, data, ts=ts, kinds=kinds, metric=metric, align=align,
                                         spec=spec, match_options=match_options, batch_size=batch_size,
                                         progress=progress, group=group)
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


# ---- demo sections (`pyrebasin demo --only merge,connectivity`) ------------------------------------

_DEMO_MLP = {"width": 128, "depth": 3}  # the quick demo's MLP: its seeds are cached already
_DEMO_EPOCHS = 10


def _demo_models(ctx, seeds: Sequence[int]):
    from ..train import TrainConfig, train_zoo

    out = [train_zoo("mlp", dataset=ctx.config.dataset, seed=s, config=TrainConfig(epochs=_DEMO_EPOCHS),
                     progress=ctx.progress, **_DEMO_MLP) for s in seeds]
    return out[0][0], [s for _, s in out]



def merge_section(ctx):
    """N seeds merged by MergeMany against the naive average and two-model matching of every pair."""
    from ..combine import evaluate_combinations
    from ..merging import cycle_consistency_error, mean_state, merge_many, pairwise_matchings
    from .plots import plot_bars

    n, ts = (3, 7) if ctx.config.quick else (5, 11)
    model, states = _demo_models(ctx, range(n))
    spec, test = model.permutation_spec(), ctx.splits["test"]
    t0 = time.perf_counter()
    res = merge_many(spec, states)
    merge_seconds = time.perf_counter() - t0
    kinds = ["endpoint_mean"]
    maps = {"naive": pairwise_barriers(model, states, test, ts=ts, kinds=kinds)[0],
            "pairwise": pairwise_barriers(model, states, test, ts=ts, kinds=kinds, align="weight", spec=spec)[0],
            "merge_many": pairwise_barriers(model, res.aligned, test, ts=ts, kinds=kinds)[0]}
    mean = {k: mean_offdiagonal(m["endpoint_mean"]) for k, m in maps.items()}
    worst = {k: float(m["endpoint_mean"].max()) for k, m in maps.items()}
    cycle = {"pairwise": cycle_consistency_error(pairwise_matchings(spec, states)),
             "merge_many": cycle_consistency_error(res.pairwise())}
    def acc(state) -> float:
        return float(evaluate_combinations(model, state, state, [1.0], test).accuracy[0])

    accuracy = {"models": [acc(s) for s in states], "naive_average": acc(mean_state(states)),
                "merge_many_average": acc(res.merged)}
    fig = plot_bars({k: {"mean": mean[k], "max": worst[k]} for k in maps}, ctx.out / "merge_barriers.png",
                    title=f"{n} MLPs: pairwise test loss barriers")
    labels = {"naive": "naive", "pairwise": "two-model matching of each pair", "merge_many": "MergeMany"}
    rows = [f"| {labels[k]} | {mean[k]:.3f} | {worst[k]:.3f} | "
            f"{'-' if k == 'naive' else f'{cycle[k]:.3f}'} |" for k in maps]
    md = "\n".join([
        f"{n} MLPs ({_DEMO_MLP}, {_DEMO_EPOCHS} epochs, seeds 0..{n - 1}) brought into one basin by MergeMany "
        f"({res.iterations} sweeps, {merge_seconds:.1f} s). Pairwise endpoint_mean test loss barriers at {ts} "
        "points; the cycle error is the fraction of units where π_ik ≠ π_jk then π_ij over all triples.", "",
        "| alignment | mean barrier | worst pair | cycle error |", "|---|---|---|---|", *rows, "",
        f"Test accuracy: models {sum(accuracy['models']) / n:.3f} (mean), naive average "
        f"{accuracy['naive_average']:.3f}, MergeMany average {accuracy['merge_many_average']:.3f}.", "",
        f"![{fig.stem}]({fig.name})"])
    data = {"n": n, "ts": ts, "sweeps": res.iterations, "converged": res.converged, "merge_seconds": merge_seconds,
            "mean_barrier": mean, "max_barrier": worst, "cycle_error": cycle, "accuracy": accuracy,
            "barriers": {k: m["endpoint_mean"].tolist() for k, m in maps.items()}}
    summary = [f"MergeMany of {n} MLPs: mean pairwise test loss barrier naive {mean['naive']:.3f} → pairwise "
               f"{mean['pairwise']:.3f} → MergeMany {mean['merge_many']:.3f}; average's accuracy "
               f"{accuracy['naive_average']:.3f} → {accuracy['merge_many_average']:.3f}"]
    from .demo import Section
    return Section("merge", "Many models: MergeMany", md, data, [fig], summary)


def _children(ctx, per_parent: int, epochs: int):
    """Children fine-tuned (own data order, lower LR) from two parents trained from seeds 0 and 1."""
    from .. import data as data_mod
    from ..train import TrainConfig, train_
    from ..zoo import build

    x, y, _, _ = data_mod.load(ctx.config.dataset)
    model, parents = _demo_models(ctx, (0, 1))
    states, names = [], []
    for p, parent in enumerate(parents):
        for c in range(per_parent):
            with torch.random.fork_rng():  # the init is overwritten: leave the caller's RNG alone
                child = build("mlp", **_DEMO_MLP)
            child.load_state_dict(parent)
            train_(child, x, y, TrainConfig(epochs=epochs, lr=1e-3, seed=100 * p + c + 1), progress=False)
            states.append({k: v.detach().clone() for k, v in child.state_dict().items()})
            names.append(f"p{p}c{c}")
    return model, states, names


def connectivity_section(ctx):
    """A map of children of two parents, naive and weight-matched: do the clusters find the parents?"""
    per_parent, epochs, ts = (3, 1, 7) if ctx.config.quick else (4, 2, 11)
    t0 = time.perf_counter()
    model, states, names = _children(ctx, per_parent, epochs)
    train_seconds = time.perf_counter() - t0
    test, planted = ctx.splits["test"], [i // per_parent for i in range(len(states))]
    data, figs, rows = {"names": names, "planted": planted, "fine_tune_seconds": train_seconds}, [], []
    for align in (None, "weight"):
        key = align or "naive"
        t0 = time.perf_counter()
        cmap = connectivity_map(model, states, test, ts=ts, align=align, names=names)
        b = cmap.barriers[cmap.cluster_kind]
        same = torch.tensor([[a == c for c in planted] for a in planted]) & ~torch.eye(len(planted), dtype=torch.bool)
        across = torch.tensor([[a != c for c in planted] for a in planted])
        entry = {"clusters": cmap.clusters, "n_clusters": cmap.n_clusters, "recovered": cmap.clusters == planted,
                 "within_max": float(b[same].max()), "across_min": float(b[across].min()),
                 "delta": cmap.delta, "seconds": time.perf_counter() - t0, "map": cmap.to_dict()}
        entry["map"].pop("curves")
        data[key] = entry
        figs.append(cmap.plot(ctx.out / f"connectivity_{key}.png",
                              title=f"{len(states)} children of 2 parents: {cmap.cluster_kind} barriers ({key})"))
        rows.append(f"| {key} | {entry['within_max']:.3f} | {entry['across_min']:.3f} | {cmap.clusters} | "
                    f"{'yes' if entry['recovered'] else 'no'} |")
    if not ctx.config.quick:
        plane = loss_plane(model, states[0], states[1], states[per_parent], test, grid=9)
        figs.append(plot_loss_plane(plane, ctx.out / "loss_plane.png",
                                    labels=(names[0], names[1], names[per_parent])))
    md = "\n".join([
        f"{len(states)} MLPs: {per_parent} children fine-tuned {epochs} epoch(s) (lr 1e-3, own data order) from "
        "each of two parents trained from seeds 0 and 1. Pairwise any_chord test loss barriers (Juneja et al.'s "
        f"largest rise above the chord of any sub-segment) at {ts} points; spectral clusters by eigengap.", "",
        "| map | worst pair within a parent | best pair across | clusters | parents recovered |",
        "|---|---|---|---|---|", *rows, "", *[f"![{f.stem}]({f.name})" for f in figs]])
    summary = [f"Connectivity map of {len(states)} children of two parents: clusters recover the parents "
               f"naive {'yes' if data['naive']['recovered'] else 'no'}, weight-matched "
               f"{'yes' if data['weight']['recovered'] else 'no'} (any_chord across ≥ {data['naive']['across_min']:.2f}"
               f" naive, ≥ {data['weight']['across_min']:.2f} matched)"]
    from .demo import Section
    return Section("connectivity", "Many models: connectivity map", md, data, figs, summary)


DEMO_SECTIONS = [merge_section, connectivity_section]
