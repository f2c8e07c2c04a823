"""Weight and activation matching on mnist1d-trained pairs, checked over several seed pairs: both lower
the midpoint barrier of MLPs far below naive, weight matching lowers a narrow ResNet20's, and the
coupling schedule reaches at least the textbook loop's objective on average."""
import itertools

import pytest

import pyrebasin as prb
from tests.claims._pairs import mean, midpoint_barriers, seed_pairs, trained_pair

pytestmark = [pytest.mark.slow, pytest.mark.claims]
TEXTBOOK = (1.0,)  # the original Git Re-Basin loop: every sweep at full coupling


def monotone(values) -> bool:
    return all(y2 >= y1 - 1e-6 * abs(y1) for y1, y2 in itertools.pairwise(values))


def measure_weight_mlp(seeds) -> dict:
    model, sa, sb = trained_pair("mlp", seeds)
    _, _, x, y = prb.data.mnist1d()
    spec = model.permutation_spec()
    result = prb.weight_matching(spec, sa, sb, schedule=TEXTBOOK)
    sched = prb.weight_matching(spec, sa, sb, schedule=prb.matching.weight.COUPLING_SCHEDULE)
    naive_loss, naive_acc = midpoint_barriers(model, sa, sb, x, y)
    loss, acc = midpoint_barriers(model, sa, prb.apply_permutation(spec, result.perms, sb), x, y)
    loss_s, acc_s = midpoint_barriers(model, sa, prb.apply_permutation(spec, sched.perms, sb), x, y)
    return {"naive_loss": naive_loss, "naive_acc": naive_acc, "loss": loss, "acc": acc, "loss_sched": loss_s,
            "acc_sched": acc_s, "monotone": monotone(result.objective),
            "sched_monotone": monotone(sched.objective[sched.phase_starts[-1]:]),
            "sched_gain": (sched.objective[-1] - result.objective[-1]) / abs(result.objective[-1])}


def measure_weight_resnet(seeds) -> dict:
    model, sa, sb = trained_pair("resnet20_ln", seeds)
    _, _, x, y = prb.data.mnist1d()
    spec = model.permutation_spec()
    result = prb.weight_matching(spec, sa, sb)
    naive_loss, naive_acc = midpoint_barriers(model, sa, sb, x, y)
    loss, acc = midpoint_barriers(model, sa, prb.apply_permutation(spec, result.perms, sb), x, y)
    return {"naive_loss": naive_loss, "naive_acc": naive_acc, "loss": loss, "acc": acc}


def measure_activation_mlp(seeds) -> dict:
    model, sa, sb = trained_pair("mlp", seeds)
    x_train, _, x, y = prb.data.mnist1d()
    spec = model.permutation_spec()
    result = prb.activation_matching(model, model, spec, x_train, state_a=sa, state_b=sb)
    naive_loss, naive_acc = midpoint_barriers(model, sa, sb, x, y)
    loss, acc = midpoint_barriers(model, sa, prb.apply_permutation(spec, result.perms, sb), x, y)
    return {"naive_loss": naive_loss, "naive_acc": naive_acc, "loss": loss, "acc": acc}


def test_mlp_weight_matching_lowers_the_barrier():
    rows = [measure_weight_mlp(p) for p in seed_pairs()]
    assert all(r["monotone"] and r["sched_monotone"] for r in rows)  # every sweep's LAP step can only gain
    # measured TODO
    assert mean(r["naive_acc"] for r in rows) > 0.25
    for m in ("", "_sched"):
        assert mean(r["acc" + m] for r in rows) < 0.1, m
        assert mean(r["acc" + m] for r in rows) < mean(r["naive_acc"] for r in rows) / 4, m
        assert mean(r["loss" + m] for r in rows) < mean(r["naive_loss"] for r in rows) / 4, m
        assert all(r["acc" + m] < r["naive_acc"] / 2 and r["loss" + m] < r["naive_loss"] / 2 for r in rows), m
    # the schedule's objective: higher on average, never more than slightly lower on one pair
    assert mean(r["sched_gain"] for r in rows) >= 0
    assert min(r["sched_gain"] for r in rows) > -0.005


def test_resnet20_weight_matching_lowers_the_barrier():
    # A narrow ResNet20 keeps a large barrier even when matched (Git Re-Basin needs width and
    # REPAIR for ResNets); the claim checked here is only that matching lowers it.
    rows = [measure_weight_resnet(p) for p in seed_pairs(3)]
    # measured TODO
    assert mean(r["naive_acc"] - r["acc"] for r in rows) > 0.05
    assert mean(r["naive_loss"] - r["loss"] for r in rows) > 0
    assert all(r["acc"] < r["naive_acc"] and r["loss"] < r["naive_loss"] for r in rows)


def test_mlp_activation_matching_lowers_the_barrier():
    rows = [measure_activation_mlp(p) for p in seed_pairs()]
    # measured TODO
    assert mean(r["acc"] for r in rows) < 0.1
    assert mean(r["acc"] for r in rows) < mean(r["naive_acc"] for r in rows) / 4
    assert mean(r["loss"] for r in rows) < mean(r["naive_loss"] for r in rows) / 4
    assert all(r["acc"] < r["naive_acc"] / 2 and r["loss"] < r["naive_loss"] / 2 for r in rows)
