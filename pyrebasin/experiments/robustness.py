"""Robustness of combinability to the matching: perturb the found perms (a fraction q of units
re-shuffled, or LAPs re-solved on noisy costs) and track barriers and combination accuracy.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import combine as cmb
from ..distributed import split_map
from ..matching.perturb import hamming_fraction, noisy_matching, perturb_permutation
from ..spec import PermutationSpec, apply_permutation
from .combinability import align, barrier_of, linear_curve
from .plots import save_figure

__all__ = ["RobustnessStudy", "robustness", "plot_robustness", "robustness_section", "matching_robustness_section"]

DEFAULT_QS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
DEFAULT_NOISE = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class RobustnessStudy:
    """One row per perturbation: kind ("shuffle" with level q, "noise" with level σ), Hamming distance
    to the found matching, loss barrier, midpoint accuracy, and combination accuracy (median, mean)."""

    rows: list[dict] = field(default_factory=list)
    distribution: str = "uniform"
    granularity: str = "element"

    def series(self, kind: str, key: str) -> tuple[list[float], list[float]]:
        rows = [r for r in self.rows if r["kind"] == kind]
        return [r["level"] for r in rows], [r[key] for r in rows]

    def to_dict(self) -> dict:
        return asdict(self)


def _evaluate(model, spec, state_a, state_b, perms, found, data, coef, ts, kind):
    b = apply_permutation(spec, perms, state_b)
    curve = linear_curve(model, state_a, b, data, ts, group=False)   # one row per rank: see robustness
    r = cmb.evaluate_combinations(model, state_a, b, coef, data, group=False)
    return {"hamming": hamming_fraction(perms, found), "barrier": barrier_of(curve, "loss", kind),
            "midpoint_accuracy": curve["accuracy"][len(curve["t"]) // 2],
            "combination_accuracy_median": float(r.accuracy.median()),
            "combination_accuracy_mean": float(r.accuracy.mean()), "combination_loss_mean": float(r.loss.mean())}


def robustness(model, spec: PermutationSpec, state_a, state_b, data, *, perms=None, qs: Sequence[float] = DEFAULT_QS,
               noise: Sequence[float] = DEFAULT_NOISE, n: int = 16, distribution: str = "uniform",
               granularity: str = "element", ts: int = 5, seed: int = 0, kind: str = "endpoint_mean") -> RobustnessStudy:
    """Barrier (`prb.barrier` of `kind` on a `prb.interpolate` curve) and combination accuracy against
    the perturbation level and the Hamming distance to the found matching (`perms`, weight matching
    when None). All perturbations are seeded. Under torch.distributed the rows (levels) are split
    among the ranks and gathered; every rank returns the single-process study."""
    found = align(spec, state_a, state_b, seed=seed) if perms is None else perms
    coef = cmb.sample_coefficients(spec, n, distribution, granularity, seed=seed, state=state_a)
    study = RobustnessStudy(distribution=str(coef.distribution), granularity=granularity)

    def row(job):
        what, level = job
        p = perturb_permutation(found, level, seed) if what == "shuffle" else \
            noisy_matching(spec, state_a, state_b, found, level, seed)
        return {"kind": what, "level": level, **_evaluate(model, spec, state_a, state_b, p, found, data, coef, ts, kind)}

    jobs = [("shuffle", q) for q in qs] + [("noise", s) for s in noise]
    study.rows.extend(split_map(row, jobs, desc="robustness", agree=(jobs, n, ts, seed)))
    return study


def plot_robustness(study: RobustnessStudy, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for kind, marker in (("shuffle", "o"), ("noise", "s")):
        lv, bar = study.series(kind, "barrier")
        _, ham = study.series(kind, "hamming")
        _, acc = study.series(kind, "combination_accuracy_median")
        if not lv:
            continue
        axes[0].plot(lv, bar, marker=marker, label=kind)
        axes[1].plot(ham, bar, marker=marker, label=kind)
        axes[2].plot(ham, acc, marker=marker, label=kind)
    axes[0].set_xlabel("level (q: fraction shuffled; σ: cost noise / std)")
    axes[0].set_ylabel("loss barrier")
    axes[1].set_xlabel("Hamming distance to found matching")
    axes[1].set_ylabel("loss barrier")
    axes[2].set_xlabel("Hamming distance to found matching")
    axes[2].set_ylabel(f"median accuracy, {study.distribution} {study.granularity}")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def robustness_section(model, spec, state_a, state_b, data, out_dir, **kw):
    study = robustness(model, spec, state_a, state_b, data, **kw)
    png = plot_robustness(study, Path(out_dir) / "robustness.png")
    rows = "\n".join(f"| {r['kind']} | {r['level']:g} | {r['hamming']:.3f} | {r['barrier']:.4f} | "
                     f"{r['combination_accuracy_median']:.3f} |" for r in study.rows)
    md = ("## Robustness of the matching\n\n| perturbation | level | Hamming | loss barrier | median combination "
          f"accuracy |\n|---|---|---|---|---|\n{rows}\n\n![robustness]({png.name})\n")
    return md, study.to_dict(), [png]


def matching_robustness_section(ctx):
    """Demo report section: perturbed weight matchings of the MLP pair."""
    from .combinability import demo_pair
    p, perms, data = demo_pair(ctx)
    return robustness_section(p.model, p.spec, p.state_a, p.state_b, data, ctx.out, perms=perms,
                              n=8 if ctx.config.quick else 16)


DEMO_SECTIONS = [matching_robustness_section]
