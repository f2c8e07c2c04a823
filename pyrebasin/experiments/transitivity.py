"""Transitivity of alignment: align A→C and B→C, then compare barrier(A′, B′) with direct alignment of B
to A and with the naive pair (Git Re-Basin's question: is "aligned to a common model" aligned?).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..distributed import split_map
from ..spec import PermutationSpec, apply_permutation
from .combinability import align, barrier_of, linear_curve
from .plots import save_figure

__all__ = ["TransitivityStudy", "transitivity", "plot_transitivity", "transitivity_section",
           "transitivity_of_alignment_section"]


@dataclass
class TransitivityStudy:
    """Loss and accuracy barriers (`prb.barrier`, endpoint_mean by default) and the `prb.interpolate`
    curves (t=0: A) of the naive, direct (B→A) and transitive (A→C, B→C) pairs."""

    barriers: dict[str, float]
    accuracy_barriers: dict[str, float]
    curves: dict[str, dict]

    def to_dict(self) -> dict:
        return asdict(self)


def transitivity(model, spec: PermutationSpec, state_a, state_b, state_c, data, *, ts: int = 11,
                 seed: int = 0, kind: str = "endpoint_mean") -> TransitivityStudy:
    """Barriers (`prb.barrier` of `kind` on `prb.interpolate` curves) of A–B naive, A–π(B) with π from
    weight matching B onto A, and π_A(A)–π_B(B) with both matched onto C. Under torch.distributed the
    matchings split their groups and the three curves are split among the ranks."""
    direct_b = apply_permutation(spec, align(spec, state_a, state_b, seed=seed), state_b)
    a_to_c = apply_permutation(spec, align(spec, state_c, state_a, seed=seed), state_a)
    b_to_c = apply_permutation(spec, align(spec, state_c, state_b, seed=seed), state_b)
    ends = {"naive": (state_a, state_b), "direct": (state_a, direct_b), "transitive": (a_to_c, b_to_c)}
    done = split_map(lambda k: linear_curve(model, *ends[k], data, ts, group=False), list(ends), desc="transitivity",
                     agree=ts)
    curves = dict(zip(ends, done))
    return TransitivityStudy({k: barrier_of(c, "loss", kind) for k, c in curves.items()},
                             {k: barrier_of(c, "accuracy", kind) for k, c in curves.items()}, curves)


def plot_transitivity(study: TransitivityStudy, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for name, c in study.curves.items():
        for ax, metric in zip(axes, ("loss", "accuracy")):
            ax.plot(c["t"], c[metric], marker="o", ms=3, label=f"{name} (barrier {study.barriers[name]:.3f})"
                    if metric == "loss" else name)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("t (0: A, 1: B)")
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def transitivity_section(model, spec, state_a, state_b, state_c, data, out_dir, **kw):
    study = transitivity(model, spec, state_a, state_b, state_c, data, **kw)
    png = plot_transitivity(study, Path(out_dir) / "transitivity.png")
    rows = "\n".join(f"| {k} | {v:.4f} | {study.accuracy_barriers[k]:.4f} |" for k, v in study.barriers.items())
    md = ("## Transitivity\n\nA and B each aligned to a third model C (transitive) vs B aligned to A (direct).\n\n"
          f"| pair | loss barrier | accuracy barrier |\n|---|---|---|\n{rows}\n\n![transitivity]({png.name})\n")
    return md, study.to_dict(), [png]


def transitivity_of_alignment_section(ctx):
    """Demo report section: the MLP pair plus a third seed C (trained with the same config, cached)."""
    from .. import train
    p = ctx.pair("mlp")
    seed_c = max(ctx.config.seeds) + 1
    _, state_c = train.train_zoo(p.config.arch, dataset=ctx.config.dataset, seed=seed_c,
                                 config=train.TrainConfig(epochs=p.config.epochs), progress=ctx.progress,
                                 **p.config.kwargs)
    return transitivity_section(p.model, p.spec, p.state_a, p.state_b, state_c, ctx.splits["test"], ctx.out)


DEMO_SECTIONS = [transitivity_of_alignment_section]
