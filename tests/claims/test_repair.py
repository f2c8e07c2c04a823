"""REPAIR on mnist1d-trained norm-free MLPs, checked over several seed pairs: it lowers the barrier of
naive and of weight-matched interpolation."""
import pytest

import pyrebasin as prb
from pyrebasin.lmc import barrier, interpolate
from tests.claims._pairs import mean, mnist1d_splits, seed_pairs, trained_pair

pytestmark = [pytest.mark.slow, pytest.mark.claims]


def measure_repair(seeds) -> dict:
    model, a, b = trained_pair("mlp", seeds)
    spec = model.permutation_spec()
    data = mnist1d_splits()
    stat = data["train"][0]
    out = {}
    aligned = prb.apply_permutation(spec, prb.weight_matching(spec, a, b, method="textbook").perms, b)  # as measured
    for name, b_ in (("naive", b), ("aligned", aligned)):
        plain = interpolate(model, a, b_, data, ts=5)
        fixed = interpolate(model, a, b_, data, ts=5, repair=True, stat_data=stat)
        out[f"{name}_loss_train"] = (barrier(plain, split="train"), barrier(fixed, split="train"))
        out[f"{name}_acc_test"] = (barrier(plain, "accuracy", split="test"), barrier(fixed, "accuracy", split="test"))
    return out


def test_repair_lowers_the_barrier_of_a_norm_free_mlp():
    rows = [measure_repair(p) for p in seed_pairs()]
    ratio = lambda key: [fixed / plain for plain, fixed in (r[key] for r in rows)]  # noqa: E731
    gain = lambda key: [plain - fixed for plain, fixed in (r[key] for r in rows)]  # noqa: E731
    # measured, pairs (0,1) (2,3) (4,5) (6,7), AVX512 | AVX2 | DEFAULT: REPAIR / plain train loss barrier,
    # naive .73 .60 .75 .75 | .75 .60 .75 .75 | .72 .60 .75 .75; aligned .79 .63 .74 .78 | .77 .63 .74 .73 |
    # .78 .63 .74 .69 (worst 0.79, mean 0.69-0.74)
    for key in ("naive_loss_train", "aligned_loss_train"):
        assert max(ratio(key)) < 0.9 and mean(ratio(key)) < 0.85, (key, ratio(key))
    # test accuracy barrier gain, naive .119 .143 .079 .107 | .121 .143 .079 .107 | .136 .143 .079 .105
    assert min(gain("naive_acc_test")) > 0.04
    # aligned: barriers of .02-.04 (20-40 of 1000 test inputs); gain +.008 +.010 +.014 -.004 | +.016 +.010
    # +.014 +.017 | +.008 +.010 +.014 .000 (mean +.007 .. +.014): REPAIR does not raise it on average
    assert mean(gain("aligned_acc_test")) > -0.005
