"""Learned matching against weight and activation matching on the trained mnist1d MLP pairs of the claim
tests: the test loss/accuracy barrier at the midpoint of each aligned pair, and each matcher's time.

    PYTHONPATH=$PWD python benchmarks/learned_matching.py [--pairs 4] [--steps 1000] [--out benchmarks/results/learned_matching.json]
Prints a table (per pair, then the mean) and writes every row to the JSON file (atomically).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import pyrebasin as prb
from pyrebasin.io import atomic_write_text
from tests.claims._pairs import mean, midpoint_barriers, seed_pairs, trained_pair

# The learners' settings: STE as in Git Re-Basin (Adam, projection every step, from weight matching);
# Sinkhorn's temperature keeps the one-hot start of weight matching nearly hard (exp(1/τ) ≫ n).
STE = dict(init="weight", lr=3e-3, batch_size=128)
SINKHORN = dict(init="weight", lr=0.03, tau=0.1, n_iter=20, batch_size=128)


def matchers(steps: int):
    return {
        "naive": lambda model, spec, sa, sb, train: None,
        "weight": lambda model, spec, sa, sb, train: prb.weight_matching(spec, sa, sb).perms,
        "activation": lambda model, spec, sa, sb, train: prb.activation_matching(
            model, model, spec, train[0], state_a=sa, state_b=sb).perms,
        "ste": lambda model, spec, sa, sb, train: prb.ste_matching(model, spec, sa, sb, train, steps=steps,
                                                                   **STE).perms,
        "sinkhorn": lambda model, spec, sa, sb, train: prb.sinkhorn_matching(model, spec, sa, sb, train,
                                                                             steps=steps, **SINKHORN).perms,
    }


def run(n_pairs: int, steps: int) -> list[dict]:
    x_train, y_train, x_test, y_test = prb.data.mnist1d()
    rows = []
    for seeds in seed_pairs(n_pairs):
        model, sa, sb = trained_pair("mlp", seeds)
        spec = model.permutation_spec()
        for name, match in matchers(steps).items():
            t0 = time.perf_counter()
            perms = match(model, spec, sa, sb, (x_train, y_train))
            seconds = time.perf_counter() - t0
            b = sb if perms is None else prb.apply_permutation(spec, perms, sb)
            loss, acc = midpoint_barriers(model, sa, b, x_test, y_test)
            rows.append(dict(pair=f"{seeds[0]}-{seeds[1]}", matcher=name, loss_barrier=loss, acc_barrier=acc,
                             seconds=seconds))
            print(f"{rows[-1]['pair']:>5} {name:>10}  loss barrier {loss:7.4f}  acc barrier {100 * acc:6.2f}%  "
                  f"{seconds:7.2f} s", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["matcher"] for r in rows):
        mine = [r for r in rows if r["matcher"] == name]
        out[name] = {k: mean(r[k] for r in mine) for k in ("loss_barrier", "acc_barrier", "seconds")}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/learned_matching.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.pairs, args.steps)
    means = summary(rows)
    wm = means["weight"]["seconds"]
    print(f"\nmean over {args.pairs} pairs ({args.steps} learner steps, batch 128):")
    print(f"{'matcher':>10} {'loss barrier':>13} {'acc barrier':>12} {'time / weight matching':>23}")
    for name, m in means.items():
        print(f"{name:>10} {m['loss_barrier']:13.4f} {100 * m['acc_barrier']:11.2f}% {m['seconds'] / wm:22.1f}x")
    atomic_write_text(args.out, json.dumps(dict(steps=args.steps, ste=STE, sinkhorn=SINKHORN, rows=rows,
                                                mean=means, threads=1), indent=1) + "\n")


if __name__ == "__main__":
    main()
