"""Measures the many-models claims on mnist1d MLPs (docs/many-models.md): pairwise barriers of N models
naive / two-model weight matching / MergeMany, cycle-consistency errors, the N-way average's accuracy, and
a connectivity map of children fine-tuned from two parents. Prints JSON; writes PNG/JSON when --out is given.

    PYTHONPATH=. python scripts/many_models_study.py --n 4 --out /tmp/many
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

import pyrebasin as prb
from pyrebasin.maps import pairwise_barriers
from pyrebasin.merging import mean_state, pairwise_from_shared, pairwise_matchings
from pyrebasin.train import TrainConfig, train_, train_zoo

ARCH = {"width": 128, "depth": 3}
EPOCHS = 10


def _mean_offdiag(m: torch.Tensor) -> float:
    n = len(m)
    return float(m.sum() / (n * (n - 1)))


def merging(n: int, test) -> dict:
    models = [train_zoo("mlp", seed=s, config=TrainConfig(epochs=EPOCHS), progress=False, **ARCH) for s in range(n)]
    model, states = models[0][0], [s for _, s in models]
    spec = model.permutation_spec()
    t0 = time.perf_counter()
    pw = pairwise_matchings(spec, states)
    t_pairwise = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = prb.merge_many(spec, states)
    t_merge = time.perf_counter() - t0
    out = {"n": n, "sweeps": merged.iterations, "converged": merged.converged,
           "seconds": {"pairwise_matchings": t_pairwise, "merge_many": t_merge}}
    naive, _ = pairwise_barriers(model, states, test, kinds=["endpoint_mean"])
    # two-model matching of each pair (j aligned to i directly): the per-pair optimum, not one space
    direct = torch.zeros(n, n, dtype=torch.float64)
    for (i, j), p in pw.items():
        c = prb.interpolate(model, states[i], prb.apply_permutation(spec, p, states[j]), test, ts=11)
        direct[i, j] = direct[j, i] = prb.barrier(c)
    # two-model matchings to model 0 only (the "reference" space): pairs (i, j) both aligned to 0
    star = pairwise_from_shared([prb.identity_permutation(spec, states[0])] + [pw[0, j] for j in range(1, n)])
    ref_states = to_ref_states(spec, states, pw)
    to_ref, _ = pairwise_barriers(model, ref_states, test, kinds=["endpoint_mean"])
    mm, _ = pairwise_barriers(model, merged.aligned, test, kinds=["endpoint_mean"])
    out["barrier_mean"] = {"naive": _mean_offdiag(naive["endpoint_mean"]), "pairwise_wm": _mean_offdiag(direct),
                           "wm_to_model0": _mean_offdiag(to_ref["endpoint_mean"]),
                           "merge_many": _mean_offdiag(mm["endpoint_mean"])}
    out["barrier_max"] = {"naive": float(naive["endpoint_mean"].max()), "pairwise_wm": float(direct.max()),
                          "wm_to_model0": float(to_ref["endpoint_mean"].max()),
                          "merge_many": float(mm["endpoint_mean"].max())}
    out["cycle_error"] = {"pairwise_wm": prb.cycle_consistency_error(pw) if n >= 3 else None,
                          "wm_to_model0": prb.cycle_consistency_error(star) if n >= 3 else None,
                          "merge_many": prb.cycle_consistency_error(merged.pairwise()) if n >= 3 else None}
    acc = lambda s: float(prb.evaluate_combinations(model, s, s, [1.0], test).accuracy[0])
    out["accuracy"] = {"endpoints_mean": sum(acc(s) for s in states) / n, "naive_average": acc(mean_state(states)),
                       "wm_to_model0_average": acc(mean_state(ref_states)),
                       "merge_many_average": acc(merged.merged)}
    return out


def to_ref_states(spec, states, pw):
    return [states[0]] + [prb.apply_permutation(spec, pw[0, j], states[j]) for j in range(1, len(states))]


def children_map(test, out_dir: str | None, per_parent: int = 4) -> dict:
    """Children fine-tuned (2 epochs, own data order, lower LR) from two parents trained from different seeds."""
    x, y, _, _ = prb.data.mnist1d()
    states, names = [], []
    for parent_seed in (0, 1):
        model, parent = train_zoo("mlp", seed=parent_seed, config=TrainConfig(epochs=EPOCHS), progress=False, **ARCH)
        for c in range(per_parent):
            child = prb.zoo.MLP(**{"in_features": 40, **ARCH})
            child.load_state_dict(parent)
            train_(child, x, y, TrainConfig(epochs=2, lr=1e-3, seed=100 * parent_seed + c + 1), progress=False)
            states.append({k: v.detach().clone() for k, v in child.state_dict().items()})
            names.append(f"p{parent_seed}c{c}")
    res = {}
    for align in (None, "weight"):
        cmap = prb.connectivity_map(model, states, test, ts=11, align=align, names=names)
        res[align or "naive"] = {"clusters": cmap.clusters, "n_clusters": cmap.n_clusters,
                                 "within_max": max(float(cmap.barriers["any_chord"][i, j]) for i, j in
                                                   itertools.combinations(range(len(states)), 2)
                                                   if names[i][:2] == names[j][:2]),
                                 "across_min": min(float(cmap.barriers["any_chord"][i, j]) for i, j in
                                                   itertools.combinations(range(len(states)), 2)
                                                   if names[i][:2] != names[j][:2])}
        if out_dir:
            cmap.plot(f"{out_dir}/connectivity_{align or 'naive'}.png")
            cmap.to_json(f"{out_dir}/connectivity_{align or 'naive'}.json")
    if out_dir:
        from pyrebasin.experiments.connectivity import plot_loss_plane
        plane = prb.loss_plane(model, states[0], states[1], states[per_parent], test, grid=11)
        plot_loss_plane(plane, f"{out_dir}/loss_plane.png", labels=(names[0], names[1], names[per_parent]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[4])
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-map", action="store_true")
    args = ap.parse_args()
    _, _, xt, yt = prb.data.mnist1d()
    test = (xt, yt)
    report = {"merging": [merging(n, test) for n in args.n]}
    if not args.no_map:
        report["children_map"] = children_map(test, args.out)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
