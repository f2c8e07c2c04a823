"""Learned matching on the mnist1d MLP pairs: the straight-through estimator, started from weight matching,
reaches a lower midpoint test-loss barrier than weight and activation matching, on average over the pairs."""
import pytest

import pyrebasin as prb
from tests.claims._pairs import mean, midpoint_barriers, seed_pairs, trained_pair

pytestmark = [pytest.mark.slow, pytest.mark.claims]


def measure(seeds) -> dict:
    model, sa, sb = trained_pair("mlp", seeds)
    x_train, y_train, x, y = prb.data.mnist1d()
    spec = model.permutation_spec()
    perms = {"weight": prb.weight_matching(spec, sa, sb).perms,
             "activation": prb.activation_matching(model, model, spec, x_train, state_a=sa, state_b=sb).perms,
             "ste": prb.ste_matching(model, spec, sa, sb, (x_train, y_train), steps=1000, lr=3e-3).perms}
    return {name: midpoint_barriers(model, sa, prb.apply_permutation(spec, p, sb), x, y)[0]
            for name, p in perms.items()}


def test_ste_reaches_the_lowest_loss_barrier_on_average():
    rows = [measure(p) for p in seed_pairs()]
    # Measured (benchmarks/learned_matching.py, 4 pairs): test-loss barrier STE 0.032-0.055 (mean 0.045),
    # weight 0.050-0.084 (0.068), activation 0.056-0.076 (0.066); STE was lowest on every pair, its
    # mean 0.68x the better of the other two. Asserted with room: below 0.85x on the average.
    best_other = min(mean(r["weight"] for r in rows), mean(r["activation"] for r in rows))
    assert mean(r["ste"] for r in rows) < 0.85 * best_other, rows
