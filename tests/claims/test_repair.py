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
    for name, b_ in (("naive", b), ("aligned", prb.apply_permutation(spec, prb.weight_matching(spec, a, b).perms, b))):
        plain = interpolate(model, a, b_, data, ts=5)
        fixed = interpolate(model, a, b_, data, ts=5, repair=True, stat_data=stat)
        out[f"{name}_loss_train"] = (barrier(plain, split="train"), barrier(fixed, split="train"))
        out[f"{name}_acc_test"] = (barrier(plain, "accuracy", split="test"), barrier(fixed, "accuracy", split="test"))
    return out


def test_repair_lowers_the_barrier_of_a_norm_free_mlp():
    rows = [measure_repair(p) for p in seed_pairs()]
    # measured TODO
    for key in ("naive_loss_train", "naive_acc_test", "aligned_loss_train", "aligned_acc_test"):
        gains = [plain - fixed for plain, fixed in (r[key] for r in rows)]
        assert mean(gains) > 0, key
