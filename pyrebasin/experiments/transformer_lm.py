"""Transformers on real text: causal byte-level GPTs trained on the standard library's source from two seeds,
their LM connectivity (naive, weight, activation, two-level head and orthogonal residual alignment, ± REPAIR)
and mode combinability at element / neuron / head / layer granularity, as a demo section.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import combine as cmb
from .. import data as data_mod
from .. import train as train_mod
from ..lm import perplexity
from ..lmc import Curve, barrier, interpolate
from ..matching import activation_matching, weight_matching
from ..matching.heads import two_level_matching
from ..matching.orthogonal import apply_orthogonal, fold_norms, residual_procrustes
from ..spec import apply_permutation
from .plots import figure, plot_bars, save_figure

__all__ = ["LMSetup", "SETUPS", "METHODS", "lm_pair", "lm_splits", "align_lm", "lm_connectivity",
           "lm_combinability", "plot_lm_curves", "transformer_section", "DEMO_SECTIONS"]

METHODS = ("naive", "weight", "activation", "two_level", "two_level_folded", "orthogonal")
GRANULARITIES = ("element", "neuron", "head", "layer")


@dataclass(frozen=True)
class LMSetup:
    """One configuration of the study: GPT kwargs, training, and how many windows each step reads."""
    arch: dict
    train: train_mod.LMConfig
    n_test: int = 128       # test windows the curves and combinations are scored on
    n_stat: int = 128       # train windows for matching and REPAIR statistics
    ts: int = 9
    n_combine: int = 8      # combinations per granularity and alignment
    corrections: tuple[str, ...] = ("plain", "repair")
    seeds: tuple[int, int] = field(default=(0, 1))
    methods: tuple[str, ...] = METHODS


SETUPS = {
    # the configuration the claims tests and `demo --quick` train (about 10 CPU-s per model at one thread)
    "small": LMSetup(dict(d_model=64, heads=4, layers=2, mlp_ratio=4),
                     train_mod.LMConfig(steps=250, batch_size=32, seq_len=64), n_test=96, n_stat=96, ts=7,
                     n_combine=6),
    "full": LMSetup(dict(d_model=128, heads=4, layers=2, mlp_ratio=4),
                    train_mod.LMConfig(steps=500, batch_size=32, seq_len=128), n_test=64, n_stat=128, ts=9,
                    n_combine=8),
}


def lm_pair(setup: LMSetup, seeds: Sequence[int] | None = None, *, progress: bool = False):
    """(model in eval mode, state A, state B): GPTs trained from two seeds (cached, one thread)."""
    states, model = [], None
    for seed in seeds or setup.seeds:
        model, state = train_mod.train_lm(seed=seed, config=setup.train, progress=progress, **setup.arch)
        states.append(state)
    return model.eval(), states[0], states[1]


def lm_splits(setup: LMSetup) -> dict[str, torch.Tensor]:
    """Token windows [n, seq_len] (the model's full context; targets are the ids shifted inside the
    loss), spread evenly over their stream: "test" over the held-out files, "stat" over the train files."""
    train, test = data_mod.pystdlib()
    t = setup.train.seq_len - 1
    return {"test": data_mod.lm_windows(test, t, setup.n_test), "stat": data_mod.lm_windows(train, t, setup.n_stat)}


def align_lm(model, state_a, state_b, stat: torch.Tensor, methods: Sequence[str] = METHODS, *,
             progress: bool = False) -> tuple[dict[str, tuple[dict, dict]], dict[str, float]]:
    """method -> (state A', state B' aligned to it) and the seconds each alignment took. Permutation
    methods keep A; the folded ones compare norm-folded A with norm-folded aligned B (the same
    functions), "orthogonal" rotating B's residual stream by Procrustes on top of two-level perms."""
    spec, per_head, layout = model.permutation_spec(), model.permutation_spec("per_head"), model.head_layout()
    norms = model.norm_names()
    out, seconds, cache = {}, {}, {}
    for m in methods:
        t0 = time.perf_counter()
        if m == "naive":
            out[m] = (state_a, state_b)
        elif m == "weight":
            out[m] = (state_a, apply_permutation(spec, weight_matching(spec, state_a, state_b).perms, state_b))
        elif m == "activation":
            cache["act"] = activation_matching(model, model, spec, stat, state_a=state_a, state_b=state_b,
                                               progress=progress)
            out[m] = (state_a, apply_permutation(spec, cache["act"].perms, state_b))
        elif m in ("two_level", "two_level_folded", "orthogonal"):
            if "two" not in cache:
                cache["two"] = two_level_matching(model, model, spec, layout, stat, state_a=state_a,
                                                  state_b=state_b, base=cache.get("act"), progress=progress).perms
            perms = cache["two"]
            if m == "two_level":
                out[m] = (state_a, apply_permutation(per_head, perms, state_b))
            else:
                fa, fb = (fold_norms(model, s, stat[:2], norms) for s in (state_a, state_b))
                if m == "two_level_folded":
                    out[m] = (fa, apply_permutation(per_head, perms, fb))
                else:
                    q = residual_procrustes(model, model, norms, stat, state_a=fa, state_b=fb)
                    out[m] = (fa, apply_orthogonal(per_head, {**perms, "P_res": q}, fb,
                                                   scales=[f"{n}.weight" for n in norms]))
        else:
            raise ValueError(f"unknown LM alignment method {m!r}; expected one of {list(METHODS)}")
        seconds[m] = time.perf_counter() - t0
    return out, seconds


def _row(c: Curve) -> dict:
    mid = len(c.ts) // 2
    loss = c.values("loss", "test")
    return {"barrier": barrier(c, split="test"), "barrier_any_chord": barrier(c, kind="any_chord", split="test"),
            "loss_a": loss[0], "loss_b": loss[-1], "loss_mid": loss[mid], "loss_max": max(loss),
            "ppl_a": perplexity(loss[0]), "ppl_b": perplexity(loss[-1]), "ppl_mid": perplexity(loss[mid]),
            "ppl_max": perplexity(max(loss)), "accuracy_mid": c.values("accuracy", "test")[mid]}


def lm_connectivity(setup: LMSetup, seeds: Sequence[int] | None = None, *, methods: Sequence[str] | None = None,
                    corrections: Sequence[str] | None = None, progress: bool = False) -> dict:
    """Curves and barriers of one seed pair: `barriers["method/correction"]` holds the test loss
    barrier (endpoint_mean and any_chord), losses and perplexities at the ends, the midpoint and the
    maximum; corrections: "plain", "repair" (REPAIR on the LayerNorms and the Linear outputs that
    feed no norm, statistics on the "stat" windows)."""
    model, a, b = lm_pair(setup, seeds, progress=progress)
    data = lm_splits(setup)
    methods = tuple(methods or setup.methods)
    pairs, seconds = align_lm(model, a, b, data["stat"], methods, progress=progress)
    curves, rows = {}, {}
    jobs = [(m, c) for m in methods for c in (corrections or setup.corrections)]
    for m, c in tqdm(jobs, desc="LM curves", disable=not progress, leave=False):
        sa, sb = pairs[m]
        cv = interpolate(model, sa, sb, {"test": data["test"]}, setup.ts, batch_size=32,
                         repair=(c == "repair"), stat_data=data["stat"])
        curves[f"{m}/{c}"] = cv
        rows[f"{m}/{c}"] = _row(cv)
    return {"model": model, "pairs": pairs, "data": data, "curves": curves, "barriers": rows,
            "match_seconds": seconds, "seeds": list(seeds or setup.seeds)}


def lm_combinability(model, state_a, pairs: dict, test: torch.Tensor, *, n: int, aligned: str = "two_level",
                     granularities: Sequence[str] = GRANULARITIES, distribution: str = "uniform",
                     seed: int = 0) -> list[dict]:
    """Test loss of n combinations θ_B + λ⊙(θ_A − θ_B) per granularity (λ ~ `distribution`), B naive
    and aligned by `aligned`, through the batched evaluator (next-token loss)."""
    spec = model.permutation_spec()
    rows = []
    for gran in granularities:
        coef = cmb.sample_coefficients(spec, n, distribution, gran, seed=seed, state=state_a)
        for name in ("naive", aligned):
            r = cmb.evaluate_combinations(model, state_a, pairs[name][1], coef, test, batch_size=32, chunk=4)
            rows.append({"granularity": gran, "alignment": name, "n": n, "distribution": str(coef.distribution),
                         "num_coefficients": coef.layout.num_coefficients, "loss_median": float(r.loss.median()),
                         "loss_min": float(r.loss.min()), "loss_max": float(r.loss.max()),
                         "ppl_median": perplexity(float(r.loss.median())), "loss": r.loss.tolist()})
    return rows


def plot_lm_curves(curves: dict[str, Curve], path: str | Path, *, correction: str = "plain", title: str = "") -> Path:
    """Test loss and perplexity against t, one line per alignment method (one correction)."""
    fig = figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for key, c in curves.items():
        m, corr = key.split("/")
        if corr != correction:
            continue
        axes[0].plot(c.ts, c.values("loss", "test"), marker="o", markersize=2.5, label=m)
        axes[1].plot(c.ts, c.perplexity("test"), marker="o", markersize=2.5, label=m)
    for ax, name in zip(axes, ("test next-token loss (nats)", "test perplexity")):
        ax.set_xlabel("t  (θ = (1−t)·θ_A + t·θ_B)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _table(rows: dict) -> str:
    lines = ["| alignment | correction | loss barrier | any-chord barrier | loss A / B | loss at t=½ | "
             "perplexity A / B | perplexity at t=½ |", "|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        m, c = key.split("/")
        lines.append(f"| {m} | {c} | {r['barrier']:.3f} | {r['barrier_any_chord']:.3f} | {r['loss_a']:.3f} / "
                     f"{r['loss_b']:.3f} | {r['loss_mid']:.3f} | {r['ppl_a']:.2f} / {r['ppl_b']:.2f} | "
                     f"{r['ppl_mid']:.2f} |")
    return "\n".join(lines)


def _combine_table(rows: list[dict]) -> str:
    lines = ["| granularity | coefficients | naive median loss | aligned median loss | aligned min / max |",
             "|---|---|---|---|---|"]
    for g in dict.fromkeys(r["granularity"] for r in rows):
        nv, al = [r for r in rows if r["granularity"] == g]
        lines.append(f"| {g} | {nv['num_coefficients']} | {nv['loss_median']:.3f} | {al['loss_median']:.3f} | "
                     f"{al['loss_min']:.3f} / {al['loss_max']:.3f} |")
    return "\n".join(lines)


def transformer_section(ctx):
    """Demo section: LM connectivity and combinability of a GPT pair on the standard-library corpus."""
    from .demo import Section

    name = "small" if ctx.config.quick else "full"
    setup = SETUPS[name]
    if ctx.config.quick:
        setup = LMSetup(setup.arch, setup.train, n_test=48, n_stat=96, ts=5, n_combine=3,
                        methods=("naive", "weight", "two_level", "orthogonal"))
    t0 = time.perf_counter()
    r = lm_connectivity(setup, progress=ctx.progress)
    curve_seconds = time.perf_counter() - t0
    combos = lm_combinability(r["model"], r["pairs"]["naive"][0], r["pairs"], r["data"]["test"], n=setup.n_combine)
    figs = [plot_lm_curves(r["curves"], ctx.out / f"lm_curves_{c}.png", correction=c,
                           title=f"GPT ({name}) on Python stdlib source: interpolation, {c}")
            for c in setup.corrections]
    groups = {m: {c: r["barriers"][f"{m}/{c}"]["barrier"] for c in setup.corrections} for m in setup.methods}
    figs.append(plot_bars(groups, ctx.out / "lm_barriers.png", title="GPT: test loss barrier (nats)"))
    train, test = data_mod.stdlib_files()
    b = r["barriers"]
    md = "\n".join([
        f"Two byte-level GPTs ({setup.arch}, {setup.train.steps} steps of {setup.train.batch_size} windows of "
        f"{setup.train.seq_len} bytes) from seeds {r['seeds']}, trained on the top-level standard-library sources of "
        f"this Python ({len(train)} train files, {len(test)} held-out files). Curves on {setup.n_test} held-out "
        f"windows, statistics on {setup.n_stat} train windows; barrier = max L(t) − ½(L(0)+L(1)) of the test "
        "next-token loss. two_level: activation matching with per-head two-level assignment; two_level_folded: "
        "the same perms between norm-folded endpoints; orthogonal: Procrustes rotation of the residual stream "
        "(all-ones direction fixed, LayerNorm) on top of them, norm-folded.", "", _table(b), "",
        f"Mode combinability (λ ~ uniform(0, 1), {setup.n_combine} samples per granularity, test loss; "
        "aligned = two_level):", "", _combine_table(combos), "", *[f"![{f.stem}]({f.name})" for f in figs]])
    summary = ["GPT on stdlib text: test loss barrier " + " → ".join(
        f"{m} {b[m + '/plain']['barrier']:.3f}" for m in setup.methods)
        + (f"; with REPAIR (two_level) {b['two_level/repair']['barrier']:.3f}"
           if "repair" in setup.corrections else "")]
    data = {"setup": name, "arch": setup.arch, "train": asdict(setup.train),
            "seeds": r["seeds"], "barriers": b, "curves": {k: c.to_dict() for k, c in r["curves"].items()},
            "combinability": combos, "match_seconds": r["match_seconds"], "curve_seconds": curve_seconds,
            "files": {"train": len(train), "test": len(test)}}
    return Section("transformer", "Transformers on text: LM connectivity and combinability", md, data, figs, summary)


DEMO_SECTIONS = [transformer_section]
