"""Functional and weight similarity of combinations: are the Θ_λ different functions from A, B and one
another (top-1 disagreement, KL/JS of softmax outputs), and how far are they in weight space (L2, cosine)?
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import combine as cmb
from .. import similarity as sim
from ..spec import PermutationSpec, apply_permutation
from .combinability import align
from .plots import save_figure

__all__ = ["SimilarityStudy", "similarity_study", "plot_similarity", "similarity_section",
           "combination_similarity_section"]

FUNCTIONAL = {"disagreement": sim.disagreement, "kl": sim.kl_divergence, "js": sim.js_divergence}


@dataclass
class SimilarityStudy:
    """metrics[setting][pair][metric]: setting "naive" | "aligned"; pair "A-B", "combo-A", "combo-B",
    "combo-combo" (means over combinations / over pairs of distinct combinations)."""

    distribution: str
    granularity: str
    n: int
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _pair_metrics(la, lb, sa, sb) -> dict[str, float]:
    # a language model's logits [N, T, V]: every token position is an example
    la, lb = la.reshape(-1, la.shape[-1]), lb.reshape(-1, lb.shape[-1])
    out = {name: float(f(la, lb)) for name, f in FUNCTIONAL.items()}
    out["weight_l2"] = sim.weight_l2(sa, sb)
    out["weight_cosine"] = sim.weight_cosine(sa, sb)
    return out


def _mean(dicts: list[dict]) -> dict:
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


def similarity_study(model, spec: PermutationSpec, state_a, state_b, data, *, perms=None, n: int = 8,
                     distribution: str = "uniform", granularity: str = "element", seed: int = 0) -> SimilarityStudy:
    """Similarity of n combinations to A, to B and to each other, naive and aligned (n >= 2)."""
    if n < 2:
        raise ValueError(f"similarity_study needs n >= 2 combinations, got {n}")
    perms = align(spec, state_a, state_b, seed=seed) if perms is None else perms
    coef = cmb.sample_coefficients(spec, n, distribution, granularity, seed=seed, state=state_a)
    study = SimilarityStudy(str(coef.distribution), granularity, n)
    for setting, b in (("naive", state_b), ("aligned", apply_permutation(spec, perms, state_b))):
        ends = cmb.evaluate_combinations(model, state_a, b, [1.0, 0.0], data, return_logits=True)
        la, lb = ends.logits[0], ends.logits[1]
        res = cmb.evaluate_combinations(model, state_a, b, coef, data, return_logits=True)
        stacked = cmb.combine_states(state_a, b, coef)
        combos = [{k: v[i] for k, v in stacked.items()} for i in range(n)]
        fa = {k: v for k, v in state_a.items() if v.is_floating_point()}
        fb = {k: v for k, v in b.items() if v.is_floating_point()}
        lc = res.logits
        study.metrics[setting] = {
            "A-B": _pair_metrics(la, lb, fa, fb),
            "combo-A": _mean([_pair_metrics(lc[i], la, combos[i], fa) for i in range(n)]),
            "combo-B": _mean([_pair_metrics(lc[i], lb, combos[i], fb) for i in range(n)]),
            "combo-combo": _mean([_pair_metrics(lc[i], lc[j], combos[i], combos[j])
                                  for i in range(n) for j in range(i + 1, n)]),
            "accuracy_combos_mean": float(res.accuracy.mean()),
        }
    return study


def plot_similarity(study: SimilarityStudy, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = ("disagreement", "js", "weight_l2", "weight_cosine")
    pairs = ("A-B", "combo-A", "combo-B", "combo-combo")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2))
    for ax, m in zip(axes, metrics):
        for si, (setting, colour) in enumerate((("naive", "0.6"), ("aligned", "tab:blue"))):
            vals = [study.metrics[setting][p][m] for p in pairs]
            ax.bar(torch.arange(len(pairs)).double() + (si - 0.5) * 0.38, vals, width=0.38, color=colour, label=setting)
        ax.set_xticks(range(len(pairs)), pairs, rotation=30)
        ax.set_title(m, fontsize=9)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def similarity_section(model, spec, state_a, state_b, data, out_dir, **kw):
    study = similarity_study(model, spec, state_a, state_b, data, **kw)
    png = plot_similarity(study, Path(out_dir) / "similarity.png")
    rows = []
    for setting, d in study.metrics.items():
        for pair in ("A-B", "combo-A", "combo-B", "combo-combo"):
            m = d[pair]
            rows.append(f"| {setting} | {pair} | {m['disagreement']:.3f} | {m['js']:.4f} | {m['weight_l2']:.2f} | "
                        f"{m['weight_cosine']:.3f} |")
    md = (f"## Similarity of combinations ({study.distribution}, {study.granularity}, n={study.n})\n\n"
          "| setting | pair | top-1 disagreement | JS | weight L2 | weight cosine |\n|---|---|---|---|---|---|\n"
          + "\n".join(rows) + f"\n\n![similarity]({png.name})\n")
    return md, study.to_dict(), [png]


def combination_similarity_section(ctx):
    """Demo report section: functional and weight similarity of combinations of the MLP pair."""
    from .combinability import demo_pair
    p, perms, data = demo_pair(ctx)
    return similarity_section(p.model, p.spec, p.state_a, p.state_b, data, ctx.out, perms=perms,
                              n=4 if ctx.config.quick else 8)


DEMO_SECTIONS = [combination_similarity_section]
