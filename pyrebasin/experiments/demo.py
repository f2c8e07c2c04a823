"""The main job behind `pyrebasin demo`: train (or load cached) model pairs on mnist1d, align them,
and report interpolation curves and barriers (naive / weight- / activation-matched, ± RESET/REPAIR).

The report is a list of section functions `fn(ctx: DemoContext) -> Section`; other studies plug in by
exposing `DEMO_SECTIONS = [fn, ...]` in a module of `pyrebasin.experiments` (found by `sections()`).
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import data as data_mod
from .. import train as train_mod
from ..fileio import atomic_write_text
from ..lmc import Curve, barrier, interpolate
from ..spec import apply_permutation

__all__ = ["DemoConfig", "PairConfig", "Pair", "DemoContext", "Section", "SECTIONS", "sections", "section_key", "run_demo",
           "lmc_section", "models_section", "METHODS"]

METHODS = ("naive", "weight", "activation")


@dataclass(frozen=True)
class PairConfig:
    arch: str
    kwargs: dict
    epochs: int
    corrections: tuple[str, ...]  # of "plain", "reset" (BN nets), "repair"
    ts: int


@dataclass
class DemoConfig:
    quick: bool = False
    dataset: str = "mnist1d"
    seeds: tuple[int, int] = (0, 1)
    n_train_eval: int = 2000   # train-split rows the curves are evaluated on (the test split is whole)
    n_stat: int = 1000         # rows for activation matching, RESET and REPAIR statistics
    pairs: dict[str, PairConfig] = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool = False) -> "DemoConfig":
        if quick:  # the configurations the test suite trains too, so their cache is shared
            return cls(True, n_train_eval=1000, n_stat=500, pairs={
                "mlp": PairConfig("mlp", {"width": 128, "depth": 3}, 10, ("plain", "repair"), 9),
                "vgg_bn": PairConfig("vgg", {}, 10, ("plain", "reset", "repair"), 7)})
        return cls(False, pairs={
            "mlp": PairConfig("mlp", {"width": 512, "depth": 3}, 10, ("plain", "repair"), 25),
            "vgg_bn": PairConfig("vgg", {}, 10, ("plain", "reset", "repair"), 13)})


@dataclass
class Section:
    """One part of the report: markdown (figures linked by file name), JSON-able data, PNG paths."""

    key: str
    title: str
    markdown: str
    data: dict
    figures: list[Path] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # one-line findings for the report's top


@dataclass
class Pair:
    """Two trained endpoints of one architecture (seeds A and B) and their alignments, computed once."""

    name: str
    config: PairConfig
    model: torch.nn.Module
    spec: object
    state_a: dict
    state_b: dict
    train_seconds: float
    perms: dict = field(default_factory=dict)
    match_seconds: dict = field(default_factory=dict)


class DemoContext:
    """What sections share: config, output folder, data splits, and lazily trained/aligned pairs."""

    def __init__(self, config: DemoConfig, out: Path, progress: bool = True):
        self.config, self.out, self.progress = config, Path(out), progress
        x, y, xt, yt = data_mod.load(config.dataset)
        self.splits = {"train": (x[:config.n_train_eval], y[:config.n_train_eval]), "test": (xt, yt)}
        self.stat_x = x[:config.n_stat]
        self._pairs: dict[str, Pair] = {}

    def pair(self, name: str) -> Pair:
        if name not in self._pairs:
            cfg = self.config.pairs[name]
            t0 = time.perf_counter()
            states = []
            for seed in self.config.seeds:
                model, state = train_mod.train_zoo(cfg.arch, dataset=self.config.dataset, seed=seed,
                                                   config=train_mod.TrainConfig(epochs=cfg.epochs),
                                                   progress=self.progress, **cfg.kwargs)
                states.append(state)
            self._pairs[name] = Pair(name, cfg, model.eval(), model.permutation_spec(), states[0], states[1],
                                     time.perf_counter() - t0)
        return self._pairs[name]

    def aligned(self, name: str, method: str) -> dict:
        """State B of pair `name` aligned to A by `method` ("naive": unaligned)."""
        from .. import matching

        p = self.pair(name)
        if method == "naive":
            return p.state_b
        if method not in p.perms:
            t0 = time.perf_counter()
            if method == "weight":
                res = matching.weight_matching(p.spec, p.state_a, p.state_b, progress=self.progress)
            elif method == "activation":
                res = matching.activation_matching(p.model, p.model, p.spec, self.stat_x, state_a=p.state_a,
                                                   state_b=p.state_b, progress=self.progress)
            else:
                raise ValueError(f"unknown alignment method {method!r}; expected one of {list(METHODS)}")
            p.perms[method] = res.perms
            p.match_seconds[method] = time.perf_counter() - t0
        return apply_permutation(p.spec, p.perms[method], p.state_b)

    def curve(self, name: str, method: str, correction: str) -> Curve:
        p = self.pair(name)
        kw = {"plain": {}, "reset": {"buffers": "reset"}, "repair": {"repair": True}}[correction]
        c = interpolate(p.model, p.state_a, self.aligned(name, method), self.splits, p.config.ts,
                        stat_data=self.stat_x, **kw)
        c.meta.update(pair=name, method=method, correction=correction)
        return c


def _accuracy(p: Pair, splits) -> dict:
    from torch.func import functional_call

    out = {}
    with torch.no_grad():
        for who, s in (("A", p.state_a), ("B", p.state_b)):
            for split, (x, y) in splits.items():
                out[f"{who}_{split}"] = float((functional_call(p.model, s, (x,)).argmax(-1) == y).float().mean())
    return out


def models_section(ctx: DemoContext) -> Section:
    rows, data = [], {}
    for name, cfg in ctx.config.pairs.items():
        p = ctx.pair(name)
        acc = _accuracy(p, ctx.splits)
        n_params = sum(v.numel() for k, v in p.state_a.items() if v.is_floating_point())
        data[name] = {"arch": cfg.arch, "kwargs": cfg.kwargs, "epochs": cfg.epochs, "params": n_params,
                      "seeds": list(ctx.config.seeds), "accuracy": acc, "train_or_load_seconds": p.train_seconds}
        rows.append(f"| {name} | {cfg.arch} {json.dumps(cfg.kwargs)} | {n_params:,} | {cfg.epochs} | "
                    f"{acc['A_test']:.3f} / {acc['B_test']:.3f} | {acc['A_train']:.3f} / {acc['B_train']:.3f} | "
                    f"{p.train_seconds:.1f} |")
    md = "\n".join([
        f"Two models per architecture, trained on {ctx.config.dataset} from seeds {ctx.config.seeds[0]} (A) and "
        f"{ctx.config.seeds[1]} (B) with identical data order (cached under `{data_mod.cache_dir()}`).", "",
        "| pair | architecture | parameters | epochs | test acc A / B | train acc A / B | train or load (s) |",
        "|---|---|---|---|---|---|---|", *rows])
    return Section("models", "Endpoint models", md, data)


def lmc_section(name: str, title: str) -> Callable[[DemoContext], Section]:
    """A section comparing naive / weight- / activation-matched interpolation of pair `name`, with
    each of the pair's corrections (plain, RESET, REPAIR): curves, barriers of every kind, plots."""
    def section(ctx: DemoContext) -> Section:
        from .plots import plot_bars, plot_curves

        p = ctx.pair(name)
        jobs = [(m, c) for c in p.config.corrections for m in METHODS]
        curves: dict[tuple[str, str], Curve] = {}
        seconds: dict[str, float] = {}
        for m, c in tqdm(jobs, desc=f"{name} curves", disable=not ctx.progress):
            t0 = time.perf_counter()
            curves[m, c] = ctx.curve(name, m, c)
            seconds[f"{m}/{c}"] = time.perf_counter() - t0
        rows, table = [], {}
        for (m, c), cv in curves.items():
            b = {f"{metric}_{kind}_{split}": barrier(cv, metric, kind, split=split)
                 for metric in ("loss", "accuracy") for kind in ("endpoint_mean", "linear", "any_chord")
                 for split in ("train", "test")}
            mid = len(cv.ts) // 2
            b["midpoint_test_accuracy"] = cv.accuracy["test"][mid]
            table[f"{m}/{c}"] = b
            rows.append(f"| {m} | {c} | {b['loss_endpoint_mean_test']:.3f} | {b['loss_endpoint_mean_train']:.3f} | "
                        f"{b['loss_linear_test']:.3f} | {b['loss_any_chord_test']:.3f} | "
                        f"{100 * b['accuracy_endpoint_mean_test']:.1f} | {100 * b['midpoint_test_accuracy']:.1f} |")
        figs = []
        for c in p.config.corrections:
            figs.append(plot_curves({m: curves[m, c] for m in METHODS}, ctx.out / f"lmc_{name}_{c}.png",
                                    title=f"{title}: interpolation, {c}"))
        groups = {m: {c: table[f"{m}/{c}"]["loss_endpoint_mean_test"] for c in p.config.corrections} for m in METHODS}
        figs.append(plot_bars(groups, ctx.out / f"barriers_{name}.png", title=f"{title}: test loss barrier"))
        best = min(table, key=lambda k: table[k]["loss_endpoint_mean_test"])
        naive = table["naive/plain"]["loss_endpoint_mean_test"]
        md = "\n".join([
            f"θ(t) = (1−t)·θ_A + t·θ_B at {p.config.ts} points, B unaligned (naive) or permuted onto A by weight "
            f"matching ({p.match_seconds.get('weight', 0):.2f} s) or activation matching "
            f"({p.match_seconds.get('activation', 0):.2f} s, {ctx.config.n_stat} train inputs). Corrections: "
            + ", ".join({"plain": "plain (BN statistics interpolated)" if "reset" in p.config.corrections else "plain",
                         "reset": "RESET (BN statistics recomputed)",
                         "repair": "REPAIR (channel statistics renormalised)"}[c] for c in p.config.corrections)
            + f". Barriers: endpoint_mean = max L(t) − ½(L(0)+L(1)); linear and any_chord as documented in "
            "`prb.barrier`. Accuracy barrier in points.", "",
            "| alignment | correction | loss barrier (test) | loss barrier (train) | linear (test) | any_chord (test) "
            "| acc. barrier (test, pts) | acc. at t=½ (test, %) |", "|---|---|---|---|---|---|---|---|", *rows, "",
            f"Lowest test loss barrier: **{best}** ({table[best]['loss_endpoint_mean_test']:.3f}, naive "
            f"{naive:.3f}).", "",
            *[f"![{f.stem}]({f.name})" for f in figs]])
        data = {"barriers": table, "curves": {f"{m}/{c}": cv.to_dict() for (m, c), cv in curves.items()},
                "match_seconds": dict(p.match_seconds), "curve_seconds": seconds}
        tb = lambda k: table[k]["loss_endpoint_mean_test"]  # noqa: E731
        summary = [f"{title.split(':')[0]}: test loss barrier naive {tb('naive/plain'):.3f} → weight matching "
                   f"{tb('weight/plain'):.3f} → activation matching {tb('activation/plain'):.3f}"
                   + "".join(f"; with {c.upper()}: {tb('weight/' + c):.3f} / {tb('activation/' + c):.3f}"
                             for c in p.config.corrections if c != "plain")]
        return Section(f"lmc_{name}", title, md, data, figs, summary)
    section.__name__ = f"lmc_{name}"
    return section


SECTIONS: list[Callable[[DemoContext], Section]] = [
    models_section,
    lmc_section("mlp", "MLP (no normalisation): linear mode connectivity"),
    lmc_section("vgg_bn", "VGG with BatchNorm: RESET and REPAIR"),
]


def sections() -> list[Callable[[DemoContext], Section]]:
    """The built-in sections, then `DEMO_SECTIONS` of every other `pyrebasin.experiments` module."""
    pkg = importlib.import_module(__package__)
    out = list(SECTIONS)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name in ("demo", "plots") or info.name.startswith("_"):
            continue
        out += list(getattr(importlib.import_module(f"{__package__}.{info.name}"), "DEMO_SECTIONS", []))
    return out


def section_key(fn) -> str:
    """The name `--only` selects a section by: its function name without a "_section" suffix."""
    return getattr(fn, "__name__", "section").removesuffix("_section")


def _as_section(fn, result) -> Section:
    if isinstance(result, Section):
        return result
    md, data, figs = result  # the (markdown, data, [png]) triple other studies return
    key = section_key(fn)
    title = md.splitlines()[0].lstrip("# ").strip() if md.startswith("#") else key
    body = "\n".join(md.splitlines()[1:]).strip() if md.startswith("#") else md
    return Section(key, title, body, data, [Path(f) for f in figs])


def run_demo(out: str | Path = "out/demo", *, quick: bool = False, progress: bool = True,
             only: Sequence[str] | None = None, config: DemoConfig | None = None) -> dict:
    """Run every section (or those whose `section_key` is in `only`), write report.json, report.md
    and the PNGs under `out`, and return the report dict."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config or DemoConfig.make(quick)
    ctx = DemoContext(cfg, out, progress)
    fns = [f for f in sections() if only is None or section_key(f) in only]
    if only is not None and len(fns) != len(set(only)):
        known = [section_key(f) for f in sections()]
        raise ValueError(f"unknown section(s) {sorted(set(only) - set(known))}; available: {known}")
    done: list[Section] = []
    timings: dict[str, float] = {}
    for fn in fns:
        t0 = time.perf_counter()
        done.append(_as_section(fn, fn(ctx)))
        timings[done[-1].key] = round(time.perf_counter() - t0, 2)
    total = time.perf_counter() - t_start
    from .. import __version__, backend
    report = {
        "title": "pyrebasin demo", "quick": cfg.quick,
        "config": {**asdict(cfg), "pairs": {k: asdict(v) for k, v in cfg.pairs.items()}},
        "environment": {"pyrebasin": __version__, "backend": backend(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "python": platform.python_version()},
        "sections": [{"key": s.key, "title": s.title, "summary": s.summary, "data": s.data,
                      "figures": [Path(f).name for f in s.figures]} for s in done],
        "seconds": {"sections": timings, "total": round(total, 2)},
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    md = [f"# pyrebasin demo{' (--quick)' if cfg.quick else ''}", "",
          f"{len(done)} sections in {total:.0f} s (backend `{backend()}`, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads). Data: `report.json`.", ""]
    findings = [line for s in done for line in s.summary]
    if findings:
        md += ["**Summary**", "", *[f"- {line}" for line in findings], ""]
    for s in done:
        md += [f"## {s.title}", "", s.markdown, ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    return report
