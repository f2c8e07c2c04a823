"""Matplotlib figures of the experiments, written atomically as PNG: interpolation curves (loss and
accuracy against t, one colour per method) and grouped barrier bars. Matplotlib loads on the first plot.

Figures are drawn on their own Agg canvas (`figure`), never through pyplot: a notebook's backend is
never switched, and no window opens.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..fileio import atomic_write
from ..lmc import Curve

__all__ = ["figure", "plot_curves", "plot_bars", "save_figure", "atomic_savefig"]


def figure(**kwargs):
    """A new matplotlib `Figure` on an Agg canvas of its own (kwargs go to Figure: figsize, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def atomic_savefig(fig, path: str | Path, **kwargs) -> Path:
    """Save a figure as PNG atomically (parent folders created)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **kwargs))


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Lay out and write a figure atomically as PNG (parent folders created); a figure that pyplot
    made is closed after, so pyplot holds no reference to it."""
    try:
        fig.tight_layout()
        return atomic_savefig(fig, path, dpi=dpi)
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")  # loaded only if the caller used pyplot
        if pyplot is not None and getattr(fig.canvas, "manager", None) is not None:
            pyplot.close(fig)

_STYLES = {"test": "-", "train": "--"}


def plot_curves(curves: Mapping[str, Curve], path: str | Path, *, title: str = "",
                splits: Sequence[str] | None = None) -> Path:
    """Two panels, loss and accuracy against t; one colour per curve label, one line style per split
    (test solid, train dashed)."""
    from matplotlib import rcParams

    fig = figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, c) in enumerate(curves.items()):
        for split in splits or c.splits:
            style = _STYLES.get(split, ":")
            kw = dict(color=colors[i % len(colors)], linestyle=style, marker="o", markersize=2.5, linewidth=1.4)
            axes[0].plot(c.ts, c.loss[split], label=f"{label} ({split})", **kw)
            axes[1].plot(c.ts, [100 * a for a in c.accuracy[split]], label=f"{label} ({split})", **kw)
    for ax, name in zip(axes, ("cross-entropy loss", "accuracy (%)")):
        ax.set_xlabel("t  (θ = (1−t)·θ_A + t·θ_B)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_title("loss")
    axes[1].set_title("accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    rows = (len(labels) + 3) // 4
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    return atomic_savefig(fig, path, dpi=110)


def plot_bars(groups: Mapping[str, Mapping[str, float]], path: str | Path, *, title: str = "",
              ylabel: str = "loss barrier") -> Path:
    """Grouped bars: `groups[group][bar] = value` (e.g. group = alignment, bar = correction)."""
    bars = list(dict.fromkeys(b for g in groups.values() for b in g))
    fig = figure(figsize=(1.6 + 1.3 * len(groups) * max(1, len(bars)) / 2, 3.8))
    ax = fig.subplots()
    width = 0.8 / max(1, len(bars))
    for j, bar in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))]
        vals = [g.get(bar, float("nan")) for g in groups.values()]
        ax.bar(xs, vals, width=width, label=bar)
        for x, v in zip(xs, vals):
            if v == v:
                ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
