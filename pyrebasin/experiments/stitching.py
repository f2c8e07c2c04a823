"""Stitching study: two models trained from different seeds, stitched at every layer with each
kind/init (before and after training the stitching layer), next to CKA, CCA and R² per layer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import data as data_mod
from .. import similarity, train
from .. import stitching as st

__all__ = ["DEFAULT_CONFIGS", "StitchingStudy", "stitching", "stitching_section"]

# (kind, init) pairs: least squares is the strong closed form; identity and random are the
# "no alignment" baselines; the others constrain the map (rank, orthogonality, one-to-one units).
DEFAULT_CONFIGS = (("affine", "least_squares"), ("affine", "identity"), ("affine", "random"),
                   ("low_rank", "least_squares"), ("orthogonal", "procrustes"),
                   ("permutation", "least_squares"), ("semi_match", "least_squares"))


@dataclass
class StitchingStudy:
    """Per (layer, kind, init, trained) metrics on the test split, and similarity indices per layer."""
    arch: str
    arch_kwargs: dict
    seeds: tuple[int, int]
    layers: list[str]
    accuracy_front: float
    accuracy_end: float
    rows: list[dict]                  # layer, kind, init, trained, + StitchMetrics fields
    cka: dict[str, float]             # linear CKA between the two models at each layer (train split)
    cca: dict[str, float]             # mean canonical correlation (SVCCA, 99% variance)
    r2: dict[str, float]              # R² of the least-squares fit front -> end
    settings: dict = field(default_factory=dict)

    def relative_accuracy(self, kind: str, init: str, trained: bool = True) -> list[float]:
        """Relative accuracy per layer (in `layers` order) of one configuration."""
        by = {r["layer"]: r["relative_accuracy"] for r in self.rows
              if r["kind"] == kind and r["init"] == init and r["trained"] == trained}
        return [by[l] for l in self.layers]

    def configs(self) -> list[tuple[str, str]]:
        return list(dict.fromkeys((r["kind"], r["init"]) for r in self.rows))

    def table(self) -> str:
        """Markdown: relative accuracy at init → after training, per layer and configuration."""
        cfgs = self.configs()
        head = "| layer | CKA | CCA | R² | " + " | ".join(f"{k} / {i}" for k, i in cfgs) + " |"
        lines = [head, "|" + "---|" * (4 + len(cfgs))]
        for j, layer in enumerate(self.layers):
            cells = [f"{self.relative_accuracy(k, i, False)[j]:.3f} → {self.relative_accuracy(k, i, True)[j]:.3f}"
                     for k, i in cfgs]
            lines.append(f"| `{layer}` | {self.cka[layer]:.3f} | {self.cca[layer]:.3f} | {self.r2[layer]:.3f} | "
                         + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StitchingStudy":
        """Inverse of `to_dict` (e.g. from a stitching.json written by `pyrebasin stitch`)."""
        return cls(**{**d, "seeds": tuple(d["seeds"])})

    def save_json(self, path: str | Path) -> Path:
        from ..fileio import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    def plot(self, path: str | Path) -> Path:
        """PNG: relative accuracy per layer per configuration (solid trained, dashed at init) | CKA, CCA, R²."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        xs = range(len(self.layers))
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [3, 2]})
        for c, (k, i) in enumerate(self.configs()):
            color = f"C{c}"
            ax.plot(xs, self.relative_accuracy(k, i, True), "-o", color=color, label=f"{k} / {i}")
            ax.plot(xs, self.relative_accuracy(k, i, False), "--", color=color, alpha=0.6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xticks=list(xs), ylabel="relative accuracy (stitched / end model)", ylim=(0, 1.1),
               title=f"{self.arch} seed {self.seeds[0]} → seed {self.seeds[1]} (solid: trained, dashed: init)")
        ax.set_xticklabels(self.layers, rotation=30, ha="right")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
        for name, vals in (("linear CKA", self.cka), ("mean CCA (SVCCA)", self.cca), ("least-squares R²", self.r2)):
            ax2.plot(xs, [vals[l] for l in self.layers], "-o", label=name)
        ax2.set(xticks=list(xs), ylim=(0, 1.05), title="representation similarity per layer")
        ax2.set_xticklabels(self.layers, rotation=30, ha="right")
        ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
        fig.tight_layout()
        from ..io import atomic_savefig

        try:
            return atomic_savefig(fig, path, dpi=110)
        finally:
            plt.close(fig)


def stitching(arch: str = "mlp", *, seeds: tuple[int, int] = (0, 1), configs=DEFAULT_CONFIGS,
              layers: list[str] | None = None, dataset: str = "mnist1d",
              train_config: train.TrainConfig | None = None, stitch_epochs: int = 3, lr: float = 1e-3,
              targets: str = "hard", rank_fraction: float = 0.25, batch_size: int = 128, seed: int = 0,
              progress: bool = True, **arch_kwargs) -> StitchingStudy:
    """Train (cached) `arch` with seeds[0] (front) and seeds[1] (end) on `dataset`, then stitch front →
    end at every layer in `layers` (default `stitching.candidate_layers`) with every (kind, init) in
    `configs`; evaluate on the test split at init and after `stitch_epochs` of Adam on the task loss.
    Low-rank stitches use rank = rank_fraction · min(channels)."""
    from tqdm.auto import tqdm

    for k, i in configs:
        if k not in st.KINDS or i not in st.INITS:
            raise ValueError(f"config ({k!r}, {i!r}): kind must be in {st.KINDS}, init in {st.INITS}")
    cfg = train_config or train.TrainConfig(epochs=10)
    front, _ = train.train_zoo(arch, dataset=dataset, seed=seeds[0], config=cfg, progress=progress, **arch_kwargs)
    end, _ = train.train_zoo(arch, dataset=dataset, seed=seeds[1], config=cfg, progress=progress, **arch_kwargs)
    x, y, xt, yt = data_mod.load(dataset)
    layers = list(layers or st.candidate_layers(front))
    rows, cka, cca, r2 = [], {}, {}, {}
    bar = tqdm(total=len(layers) * len(configs), desc=f"stitching {arch}", disable=not progress)
    for layer in layers:
        moments, _ = st.layer_moments(front, end, layer, layer, x)  # one pass per layer, shared by all configs
        cka[layer] = similarity.linear_cka(moments)
        cca[layer] = similarity.cca_similarity(moments, kind="svcca")
        for kind, init in configs:
            c = min(moments.xy.sum_xy.shape)
            s = st.stitch(front, end, layer, data=x, kind=kind, init=init, moments=moments, seed=seed,
                          rank=max(1, int(rank_fraction * c)))
            r2[layer] = s.fit.r2
            rows.append({"layer": layer, "kind": kind, "init": init, "trained": False,
                         **st.evaluate_stitch(s, (xt, yt)).to_dict()})
            st.train_stitch_(s, (x, y), targets=targets, epochs=stitch_epochs, lr=lr, batch_size=batch_size,
                             seed=seed, progress=False)
            rows.append({"layer": layer, "kind": kind, "init": init, "trained": True,
                         **st.evaluate_stitch(s, (xt, yt)).to_dict()})
            bar.update()
    bar.close()
    settings = {"dataset": dataset, "train_config": asdict(cfg), "stitch_epochs": stitch_epochs, "lr": lr,
                "targets": targets, "rank_fraction": rank_fraction, "batch_size": batch_size, "seed": seed,
                "channel_convention": "conv maps: channels are features, positions count as samples"}
    return StitchingStudy(arch, dict(arch_kwargs), tuple(seeds), layers, train.evaluate(front, xt, yt)[1],
                          train.evaluate(end, xt, yt)[1], rows, cka, cca, r2, settings)


DEMO_CONFIGS = (("affine", "least_squares"), ("affine", "identity"), ("orthogonal", "procrustes"),
                ("permutation", "least_squares"))
QUICK = dict(arch="mlp", width=128, depth=3, train_config=train.TrainConfig(epochs=10), stitch_epochs=2)


def stitching_section(out_dir: str | Path, *, study: StitchingStudy | None = None, quick: bool = True,
                      progress: bool = False, **kwargs) -> tuple[str, dict, list[Path]]:
    """The demo report's stitching section: (markdown, JSON-able dict, [PNG path]); runs the study
    (MLP 40-128x3 when `quick`, else 512-wide; `kwargs` go to `stitching`) unless one is given, and
    writes its PNG under out_dir."""
    if study is None:
        kw = dict(QUICK)
        if not quick:
            kw.update(width=512, stitch_epochs=3)
        study = stitching(progress=progress, **{**kw, **kwargs})
    png = study.plot(Path(out_dir) / "stitching.png")
    best = max(study.configs(), key=lambda c: min(study.relative_accuracy(*c)))
    md = "\n".join([
        "## Stitching (Dr. Frankenstein) and representation similarity",
        "",
        f"{study.arch} ({', '.join(f'{k}={v}' for k, v in study.arch_kwargs.items()) or 'default size'}) "
        f"seed {study.seeds[0]} (front, test acc {study.accuracy_front:.3f}) "
        f"stitched into seed {study.seeds[1]} (end, test acc {study.accuracy_end:.3f}) at every layer. "
        "Cells: relative accuracy (stitched / end model) with the closed-form or baseline init → after "
        f"training the stitching layer for {study.settings['stitch_epochs']} epochs on the task loss.",
        "",
        study.table(),
        "",
        f"Most robust configuration: **{best[0]} / {best[1]}** (worst layer "
        f"{min(study.relative_accuracy(*best)):.3f}).",
        "",
        f"![stitching]({png.name})",
    ])
    return md, study.to_dict(), [png]


def _demo_section(ctx) -> tuple[str, dict, list[Path]]:
    """`pyrebasin demo`'s stitching section (the demo's seeds, dataset and quick flag; its MLP sizes,
    so the trained models come from the shared cache)."""
    # The full demo keeps to its 5-minute budget: the 512-wide pair, the four configurations that
    # tell the story (closed form vs identity vs the constrained maps), one epoch of training.
    extra = {} if ctx.config.quick else dict(stitch_epochs=1, configs=DEMO_CONFIGS)
    return stitching_section(ctx.out, quick=ctx.config.quick, progress=ctx.progress,
                             seeds=tuple(ctx.config.seeds), dataset=ctx.config.dataset, **extra)


_demo_section.__name__ = "stitching_section"  # the demo's `--only stitching` key
DEMO_SECTIONS = [_demo_section]
