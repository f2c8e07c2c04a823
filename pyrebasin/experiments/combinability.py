"""Mode combinability study: loss/accuracy distributions of element-wise combinations Θ_λ per coefficient
distribution × granularity, naive vs permutation-aligned, plus the helpers the other combine studies share.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import combine as cmb
from ..batches import finite_float
from ..spec import PermutationSpec, apply_permutation
from .plots import save_figure

__all__ = ["CombinabilityStudy", "combinability", "plot_combinability", "combinability_section", "linear_curve",
           "mode_combinability_section",
           "barrier_of", "mnist1d_mlps", "zoo_models", "align", "demo_pair", "DEFAULT_DISTRIBUTIONS"]

DEFAULT_DISTRIBUTIONS = ("uniform", "uniform(-0.25, 1.25)", "bernoulli(0.5)", "beta(0.5, 0.5)",
                         "gaussian(0.5, 0.15, clip)")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def zoo_models(arch: str = "mlp", n_models: int = 2, *, dataset: str = "mnist1d", epochs: int = 10,
               progress: bool = False, **arch_kwargs):
    """(model, spec, [state per seed 0..n-1], (x_test, y_test)): zoo models trained on `dataset` (cached)."""
    from .. import data, train
    cfg = train.TrainConfig(epochs=epochs)
    states, model = [], None
    for seed in range(n_models):
        model, st = train.train_zoo(arch, dataset=dataset, seed=seed, config=cfg, progress=progress, **arch_kwargs)
        states.append(st)
    _, _, x, y = data.load(dataset)
    return model, model.permutation_spec(), states, (x, y)


def mnist1d_mlps(n_models: int = 2, *, width: int = 128, depth: int = 3, epochs: int = 10, progress: bool = False):
    """`zoo_models` for MLPs on mnist1d (the configuration the tests and the CLI default use)."""
    return zoo_models("mlp", n_models, epochs=epochs, progress=progress, width=width, depth=depth)


def align(spec: PermutationSpec, state_a, state_b, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weight matching of B onto A; returns the perms (apply them to B)."""
    from ..matching import weight_matching
    return weight_matching(spec, state_a, state_b, seed=seed).perms


def linear_curve(model, state_a, state_b, data, ts: int | Sequence[float] = 11, *, chunk: int = 16,
                 group=None) -> dict:
    """Loss and accuracy along θ(t) = (1−t)·θ_A + t·θ_B (t=0: A, t=1: B): `prb.interpolate` on one data set."""
    from ..lmc import interpolate
    c = interpolate(model, state_a, state_b, data, ts, chunk=chunk, group=group)
    return {"t": list(c.ts), "loss": c.values("loss"), "accuracy": c.values("accuracy")}


def barrier_of(curve: dict, metric: str = "loss", kind: str = "endpoint_mean") -> float:
    """`prb.barrier` of a `linear_curve` dict (default kind "endpoint_mean", as `prb.barrier`)."""
    from ..lmc import Curve, barrier
    return barrier(Curve(list(curve["t"]), {"data": list(curve["loss"])}, {"data": list(curve["accuracy"])}),
                   metric, kind)


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(x.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"q{int(p * 100):02d}": float(v) for p, v in zip(QUANTILES, q)}


@dataclass
class CombinabilityStudy:
    """One row per (distribution, granularity, aligned); `samples` keeps every combination's metrics."""

    endpoints: dict
    eps: float
    rows: list[dict] = field(default_factory=list)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def row(self, distribution: str, granularity: str, aligned: bool) -> dict:
        for r in self.rows:
            if (r["distribution"], r["granularity"], r["aligned"]) == (distribution, granularity, aligned):
                return r
        raise KeyError((distribution, granularity, aligned))

    def to_dict(self) -> dict:
        return asdict(self)


def combinability(model, spec: PermutationSpec, state_a, state_b, data, *, perms=None,
                  distributions: Sequence[str] = DEFAULT_DISTRIBUTIONS,
                  granularities: Sequence[str] = cmb.GRANULARITIES, n: int = 32, seed: int = 0, eps: float = 0.05,
                  chunk: int = 16, progress: bool = False) -> CombinabilityStudy:
    """Evaluate n combinations per distribution × granularity, between A and B as given (naive) and
    between A and B aligned by `perms` (weight matching when None). Reports quantiles of loss and
    accuracy and the fraction of samples within `eps` of the endpoints' mean (loss ≤ mean + eps nats,
    accuracy ≥ mean − eps). Every sample is replayable from (seed, k)."""
    eps = finite_float(eps, "eps")
    perms = align(spec, state_a, state_b) if perms is None else perms
    pairs = {False: state_b, True: apply_permutation(spec, perms, state_b)}
    ends = cmb.evaluate_combinations(model, state_a, state_b, [1.0, 0.0], data)
    mean_loss, mean_acc = float(ends.loss.mean()), float(ends.accuracy.mean())
    study = CombinabilityStudy({"loss_a": float(ends.loss[0]), "loss_b": float(ends.loss[1]),
                                "accuracy_a": float(ends.accuracy[0]), "accuracy_b": float(ends.accuracy[1]),
                                "mean_loss": mean_loss, "mean_accuracy": mean_acc}, eps)
    jobs = [(d, g, al) for d in distributions for g in granularities for al in (False, True)]
    from tqdm.auto import tqdm
    for dist, gran, aligned in tqdm(jobs, desc="combinability", disable=not progress, leave=False):
        b = pairs[aligned]
        coef = cmb.sample_coefficients(spec, n, dist, gran, seed=seed, state=state_a)
        start = time.perf_counter()
        r = cmb.evaluate_combinations(model, state_a, b, coef, data, chunk=chunk)
        row = {"distribution": str(coef.distribution), "granularity": gran, "aligned": aligned, "n": n,
               "seconds": time.perf_counter() - start,
               "loss_mean": float(r.loss.mean()), "accuracy_mean": float(r.accuracy.mean()),
               "loss": _quantiles(r.loss), "accuracy": _quantiles(r.accuracy),
               "frac_loss_within_eps": float((r.loss <= mean_loss + eps).double().mean()),
               "frac_accuracy_within_eps": float((r.accuracy >= mean_acc - eps).double().mean())}
        study.rows.append(row)
        study.samples[f"{row['distribution']}|{gran}|{'aligned' if aligned else 'naive'}"] = {
            "loss": r.loss.tolist(), "accuracy": r.accuracy.tolist()}
    return study


def plot_combinability(study: CombinabilityStudy, path: str | Path, metric: str = "accuracy") -> Path:
    """Box plots of the metric per granularity, naive (grey) vs aligned (blue), one panel per distribution."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dists = list(dict.fromkeys(r["distribution"] for r in study.rows))
    grans = list(dict.fromkeys(r["granularity"] for r in study.rows))
    fig, axes = plt.subplots(1, len(dists), figsize=(3.2 * len(dists), 3.4), sharey=True, squeeze=False)
    for ax, dist in zip(axes[0], dists):
        for gi, gran in enumerate(grans):
            for aligned, colour, dx in ((False, "0.6", -0.18), (True, "tab:blue", 0.18)):
                key = f"{dist}|{gran}|{'aligned' if aligned else 'naive'}"
                if key in study.samples:
                    bp = ax.boxplot(study.samples[key][metric], positions=[gi + dx], widths=0.3, patch_artist=True,
                                    showfliers=False)
                    for patch in bp["boxes"]:
                        patch.set_facecolor(colour)
        ax.axhline(study.endpoints[f"mean_{metric}"], ls="--", c="k", lw=0.8)
        ax.set_xticks(range(len(grans)), grans, rotation=30)
        ax.set_title(dist, fontsize=9)
    axes[0][0].set_ylabel(metric)
    fig.suptitle("grey: naive · blue: aligned · dashed: endpoints' mean", fontsize=9)
    return save_figure(fig, path)


def combinability_table(study: CombinabilityStudy) -> str:
    lines = ["| distribution | granularity | naive acc (median) | aligned acc (median) | naive within ε | aligned within ε |",
             "|---|---|---|---|---|---|"]
    for r in study.rows:
        if r["aligned"]:
            continue
        a = study.row(r["distribution"], r["granularity"], True)
        lines.append(f"| {r['distribution']} | {r['granularity']} | {r['accuracy']['q50']:.3f} | "
                     f"{a['accuracy']['q50']:.3f} | {r['frac_accuracy_within_eps']:.2f} | "
                     f"{a['frac_accuracy_within_eps']:.2f} |")
    return "\n".join(lines)


def combinability_section(model, spec, state_a, state_b, data, out_dir: str | Path, *, perms=None,
                          **kwargs) -> tuple[str, dict, list[Path]]:
    """Report section for the demo: (markdown, JSON-able dict, PNG paths)."""
    study = combinability(model, spec, state_a, state_b, data, perms=perms, **kwargs)
    png = plot_combinability(study, Path(out_dir) / "combinability.png")
    e = study.endpoints
    md = (f"## Mode combinability\n\nEndpoints: accuracy A {e['accuracy_a']:.3f}, B {e['accuracy_b']:.3f}; "
          f"combinations Θ_λ = λ⊙Θ_A + (1−λ)⊙Θ_B, {study.rows[0]['n']} samples each; "
          f"'within ε' = accuracy ≥ endpoints' mean − {study.eps}.\n\n{combinability_table(study)}\n\n"
          f"![combinability]({png.name})\n")
    return md, study.to_dict(), [png]


def demo_pair(ctx):
    """The demo's MLP pair (A, B aligned by weight matching) and the test split."""
    ctx.aligned("mlp", "weight")
    p = ctx.pair("mlp")
    return p, p.perms["weight"], ctx.splits["test"]


def mode_combinability_section(ctx):
    """Demo report section (`pyrebasin demo`): the combinability study on the MLP pair."""
    p, perms, data = demo_pair(ctx)
    quick = ctx.config.quick
    return combinability_section(p.model, p.spec, p.state_a, p.state_b, data, ctx.out, perms=perms,
                                 n=8 if quick else 16,
                                 distributions=("uniform", "bernoulli(0.5)") if quick else DEFAULT_DISTRIBUTIONS,
                                 progress=ctx.progress)


DEMO_SECTIONS = [mode_combinability_section]
