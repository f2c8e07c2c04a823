"""Matcher study: weight-matching variants on trained mnist1d pairs (benchmarks/_matcher_pairs.py), several
group-order seeds each; per matcher the objective gap to the best known, the test barriers and the time.

    PYTHONPATH=$PWD python benchmarks/matchers.py [--seeds 3] [--only mlp] [--out benchmarks/results/matchers.json]
Prints a table; writes every run to the JSON file (atomically). Models train once (cached by train_zoo).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import pyrebasin as prb
from pyrebasin.io import atomic_write_text
from pyrebasin.matching import select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _matcher_pairs import PAIRS, pairs  # noqa: E402

# name -> weight_matching keyword arguments; a run with matcher seed s passes seed=1000*s so that the
# restarts of different runs never share group orders.
MATCHERS = {
    "textbook": dict(method="textbook"),
    "schedule": dict(method="schedule"),
    "restarts4": dict(method="textbook", restarts=4),
    "schedule+restarts4": dict(method="schedule", restarts=4),
    "default": dict(),
    "thorough": dict(method="thorough"),
    # the default's data-aware tie-break: select.DATA_RESTARTS group orders, of those within select.TIE of
    # the best objective the one with the lowest midpoint loss on the training set kept (the barrier is
    # measured on the test set); "default+data:any" compares every order (TIE = inf)
    "default+data": dict(data="train"),
    "default+data:any": dict(data="train", tie=math.inf),
}
TS = [0.0, 0.25, 0.5, 0.75, 1.0]


def barriers(model, a, b, test, stat_x):
    """(test-accuracy barrier, test-loss barrier, lowest test accuracy on the path) of the straight path,
    endpoint-mean convention; BN nets get their statistics reset at every t (RESET), as matched BN nets
    are evaluated."""
    bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    curve = prb.interpolate(model, a, b, test, ts=TS, buffers="reset" if bn else "interpolate",
                            stat_data=stat_x if bn else None)
    return prb.barrier(curve, "accuracy"), prb.barrier(curve, "loss"), min(curve.values("accuracy"))


def noise(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy `acc` measured on `n` test examples: the resolution of a
    barrier estimate (two matchers' barriers on one test set differ by less than ~2 of these by chance)."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / n)


def run(seeds: int, only: str | None, matchers: list[str]):
    _, _, xt, yt = prb.data.mnist1d()
    x, y, _, _ = prb.data.mnist1d()
    stat_x = x[:1000]
    rows = []
    for pair, model, a, b in pairs(only):
        spec = model.permutation_spec()
        naive = barriers(model, a, b, (xt, yt), stat_x)[:2]
        print(f"{pair}: naive accuracy barrier {naive[0]:.3f}", flush=True)
        for name in matchers:
            for s in range(seeds):
                t0, c0 = time.perf_counter(), time.process_time()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    kw = dict(MATCHERS[name])
                    if kw.pop("data", None):
                        kw.update(model=model, data=(x, y))
                    tie, select.TIE = select.TIE, kw.pop("tie", select.TIE)
                    try:
                        res = prb.weight_matching(spec, a, b, seed=1000 * s, **kw)
                    finally:
                        select.TIE = tie
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                acc, loss, low = barriers(model, a, prb.apply_permutation(spec, res.perms, b), (xt, yt), stat_x)
                rows.append(dict(pair=pair, matcher=name, seed=s, objective=res.objective[-1], sweeps=res.iterations,
                                 time_s=dt, cpu_s=cpu, acc_barrier=acc, loss_barrier=loss, naive_acc_barrier=naive[0],
                                 naive_loss_barrier=naive[1], max_iter_warnings=len(caught), acc_path_min=low,
                                 n_test=len(yt), kept_seed=res.seed))
    return rows


def summarise(rows):
    """Per matcher: objective gap to the pair's best known (%, median and worst over runs), share of
    MLP runs within 0.5%, accuracy barrier (median, worst over runs), pairs whose worst barrier is above
    the textbook loop's median on that pair, time relative to the textbook loop (median over pairs)."""
    best = {}
    for r in rows:
        best[r["pair"]] = max(best.get(r["pair"], float("-inf")), r["objective"])
    by = {}
    for r in rows:
        r["gap_pct"] = 100 * (best[r["pair"]] - r["objective"]) / abs(best[r["pair"]])
        if r["matcher"] == "textbook" and any(q["seed"] == r["seed"] for q in by.get("textbook", {}).get(r["pair"], [])):
            continue  # deterministic: a merged file's rerun repeats its numbers (its times still count below)
        by.setdefault(r["matcher"], {}).setdefault(r["pair"], []).append(r)
    tb = by.get("textbook", {})
    def seconds(r):  # CPU time where the run recorded it (a loaded machine distorts wall time)
        return r.get("cpu_s", r["time_s"])

    tb_time = {}
    for r in rows:
        if r["matcher"] == "textbook":
            tb_time.setdefault((r.get("run"), r["pair"]), []).append(seconds(r))
    out = {}
    for m, per_pair in by.items():
        runs = [r for rs in per_pair.values() for r in rs]
        mlp = [r for r in runs if r["pair"].startswith("mlp")]
        above, above_worst, excess, loss_above, ratios, above_noise = [], [], [], [], [], []
        for pair, rs in per_pair.items():
            if pair in tb:
                tmed = statistics.median(r["acc_barrier"] for r in tb[pair])
                worst = max(r["acc_barrier"] for r in rs)
                excess.append(worst - tmed)
                if worst > tmed + 1e-9:
                    above.append(pair)
                wr = max(rs, key=lambda r: r["acc_barrier"])
                if "acc_path_min" in wr and worst > tmed + 2 * math.sqrt(2) * noise(wr["acc_path_min"], wr["n_test"]):
                    above_noise.append(pair)
                if worst > max(r["acc_barrier"] for r in tb[pair]) + 1e-9:
                    above_worst.append(pair)
                lmed = statistics.median(r["loss_barrier"] for r in tb[pair])
                if max(r["loss_barrier"] for r in rs) > lmed + 1e-9:
                    loss_above.append(pair)
                for run_id in {r.get("run") for r in rs}:  # times compare only within one run of the script
                    base = tb_time.get((run_id, pair))
                    if base:
                        ratios.append(statistics.median(seconds(r) for r in rs if r.get("run") == run_id) /
                                      statistics.median(base))
        out[m] = dict(
            gap_median_pct=statistics.median(r["gap_pct"] for r in runs),
            gap_worst_pct=max(r["gap_pct"] for r in runs),
            mlp_within_half_pct=(sum(r["gap_pct"] <= 0.5 for r in mlp) / len(mlp)) if mlp else None,
            acc_barrier_median=statistics.median(r["acc_barrier"] for r in runs),
            acc_barrier_worst=max(r["acc_barrier"] for r in runs),
            pairs_worst_above_textbook_median=above, pairs_worst_loss_above_textbook_median=loss_above,
            pairs_worst_above_textbook_worst=above_worst,
            # above by more than 2 standard errors of a difference of two test accuracies (2*sqrt(2)*SE)
            pairs_worst_above_textbook_median_beyond_noise=above_noise,
            worst_minus_textbook_median_max=max(excess) if excess else None,
            time_vs_textbook=statistics.median(ratios) if ratios else None,
            time_vs_textbook_worst=max(ratios) if ratios else None,
            max_iter_warnings=sum(r["max_iter_warnings"] for r in runs))
    return out


def print_table(rows, summary):
    pairs_ = list(dict.fromkeys(r["pair"] for r in rows))
    print(f"\n{len(pairs_)} pairs; per pair: median test-accuracy barrier over matcher seeds (worst in brackets)")
    names = list(summary)
    print("pair".ljust(22) + "naive".rjust(7) + "".join(n[:18].rjust(20) for n in names))
    for p in pairs_:
        line = p.ljust(22) + f"{next(r['naive_acc_barrier'] for r in rows if r['pair'] == p):7.3f}"
        for n in names:
            rs = [r["acc_barrier"] for r in rows if r["pair"] == p and r["matcher"] == n]
            line += f"{statistics.median(rs):11.3f} ({max(rs):.3f})" if rs else " " * 20
        print(line)
    print("\nmatcher".ljust(22) + " gap med/worst %  MLP<=0.5%  acc barrier med/worst  pairs worst>tb median"
          " (max excess; beyond noise)  pairs worst>tb worst  time/textbook (worst)")
    for n, s in summary.items():
        mlp = f"{100 * s['mlp_within_half_pct']:5.0f}%" if s["mlp_within_half_pct"] is not None else "    -"
        tv = f"{s['time_vs_textbook']:.2f}x ({s['time_vs_textbook_worst']:.2f}x)" if s["time_vs_textbook"] else "-"
        excess = "-" if s["worst_minus_textbook_median_max"] is None else f"{s['worst_minus_textbook_median_max']:+.3f}"
        print(f"{n:21s} {s['gap_median_pct']:7.3f} / {s['gap_worst_pct']:6.3f}   {mlp}     {s['acc_barrier_median']:.3f} / "
              f"{s['acc_barrier_worst']:.3f}        {len(s['pairs_worst_above_textbook_median']):2d} / {len(pairs_)} "
              f"({excess}; {len(s['pairs_worst_above_textbook_median_beyond_noise'])})     "
              f"{len(s['pairs_worst_above_textbook_worst']):2d} / "
              f"{len(pairs_)}             {tv}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default=None, help="substring of a pair name")
    ap.add_argument("--matchers", default=",".join(MATCHERS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "matchers.json"))
    ap.add_argument("--from-json", default=None,
                    help="comma-separated JSON files of earlier runs: merge them (a later file's run of the same "
                         "pair, matcher and seed wins), summarise, and write the merge to --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_json:
        merged = {}
        for f in args.from_json.split(","):
            for r in json.loads(Path(f).read_text())["runs"]:
                r.setdefault("run", Path(f).name)
                # Runs of matchers no longer defined here are dropped; the textbook loop is deterministic,
                # its rows are kept per file so that every matcher's time compares with its own run's.
                if r["matcher"] in MATCHERS:
                    merged[(r["pair"], r["matcher"], r["seed"], r["run"] if r["matcher"] == "textbook" else "")] = r
        order = list(PAIRS)
        rows = sorted(merged.values(), key=lambda r: (order.index(r["pair"].split("/")[0]), r["pair"]))
    else:
        rows = run(args.seeds, args.only, args.matchers.split(","))
        for r in rows:
            r["run"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    summary = summarise(rows)
    print_table(rows, summary)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    configs = {k: dict(arch=v[0], kwargs=v[1], epochs=v[2], seed_pairs=v[3]) for k, v in PAIRS.items()}
    atomic_write_text(args.out, json.dumps(dict(
        train_configs=configs, train_defaults=prb.train.TrainConfig().__dict__, matchers=MATCHERS,
        default=prb.matching.METHODS["default"], seeds=args.seeds, threads=args.threads, ts=TS,
        torch=torch.__version__, summary=summary, runs=rows), indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
