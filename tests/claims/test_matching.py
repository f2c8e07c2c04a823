"""Weight and activation matching on mnist1d-trained pairs, checked over several seed pairs: both lower
the midpoint barrier of MLPs far below naive, weight matching + REPAIR lowers a narrow ResNet20's, and the
coupling schedule reaches at least the textbook loop's objective on average."""
import itertools

import pytest

import pyrebasin as prb
from pyrebasin.lmc import barrier, interpolate
from tests.claims._pairs import mean, midpoint_barriers, seed_pairs, trained_pair

pytestmark = [pytest.mark.slow, pytest.mark.claims]
TEXTBOOK = "textbook"  # the original Git Re-Basin loop: every sweep at full coupling


def monotone(values) -> bool:
    return all(y2 >= y1 - 1e-6 * abs(y1) for y1, y2 in itertools.pairwise(values))


def measure_weight_mlp(seeds) -> dict:
    model, sa, sb = trained_pair("mlp", seeds)
    _, _, x, y = prb.data.mnist1d()
    spec = model.permutation_spec()
    result = prb.weight_matching(spec, sa, sb, method=TEXTBOOK)
    sched = prb.weight_matching(spec, sa, sb, method="schedule")
    default = prb.weight_matching(spec, sa, sb)
    naive_loss, naive_acc = midpoint_barriers(model, sa, sb, x, y)
    loss, acc = midpoint_barriers(model, sa, prb.apply_permutation(spec, result.perms, sb), x, y)
    loss_s, acc_s = midpoint_barriers(model, sa, prb.apply_permutation(spec, sched.perms, sb), x, y)
    loss_d, acc_d = midpoint_barriers(model, sa, prb.apply_permutation(spec, default.perms, sb), x, y)
    return {"naive_loss": naive_loss, "naive_acc": naive_acc, "loss": loss, "acc": acc, "loss_sched": loss_s,
            "acc_sched": acc_s, "loss_default": loss_d, "acc_default": acc_d, "monotone": monotone(result.objective),
            "sched_monotone": monotone(sched.objective[sched.phase_starts[-1]:]),
            "sched_gain": (sched.objective[-1] - result.objective[-1]) / abs(result.objective[-1]),
            "default_gain": (default.objective[-1] - result.objective[-1]) / abs(result.objective[-1])}


def measure_weight_resnet(seeds) -> dict:
    model, sa, sb = trained_pair("resnet20_ln", seeds)
    x_train, _, x, y = prb.data.mnist1d()
    spec = model.permutation_spec()
    sb_wm = prb.apply_permutation(spec, prb.weight_matching(spec, sa, sb, method=TEXTBOOK).perms, sb)
    out = {}
    for name, b in (("naive", sb), ("wm", sb_wm)):
        out[name] = midpoint_barriers(model, sa, b, x, y)
        c = interpolate(model, sa, b, (x, y), ts=[0.0, 0.5, 1.0], repair=True, stat_data=x_train[:1000])
        out[name + "_repair"] = (barrier(c), barrier(c, "accuracy"))
    return out


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
    # measured, pairs (0,1) (2,3) (4,5) (6,7) under AVX512 | AVX2 | DEFAULT kernels: midpoint test barriers
    # naive accuracy .33-.37, loss 1.01-1.23; textbook accuracy .022 .040 .018 .019 | .033 .040 .018 .038 |
    # .030 .040 .018 .023, loss .059-.102; schedule accuracy .005-.038, loss .048-.094 (worst ratio to
    # naive: 0.12 accuracy, 0.10 loss)
    assert min(r["naive_acc"] for r in rows) > 0.25
    # default (schedule settled at 0.1%/sweep + two passes of local search): accuracy .036 .035 .024 .006 |
    # .018 .034 .024 .030, loss .041-.092 (AVX512 | AVX2; worst ratio to naive .11 accuracy, .09 loss)
    for m in ("", "_sched", "_default"):
        assert all(r["acc" + m] < r["naive_acc"] / 4 and r["loss" + m] < r["naive_loss"] / 4 for r in rows), m
        assert mean(r["acc" + m] for r in rows) < 0.06, m
    # The schedule's final objective relative to the textbook loop's: +.0083 +.0071 +.0129 -.0012 | +.0192
    # +.0071 +.0129 +.0085 | +.0129 +.0071 +.0129 -.0005 (mean +.0068 .. +.0119): higher on average, on a
    # single pair sometimes slightly lower (the original failure: 396.55 vs 397.07 on one pair).
    assert mean(r["sched_gain"] for r in rows) > 0.002
    assert min(r["sched_gain"] for r in rows) > -0.005
    # The default's objective relative to the textbook loop's: +.0083 +.0034 +.0114 +.0071 | +.0212 +.0029
    # +.0114 +.0126 (AVX512 | AVX2): higher on every measured pair.
    assert mean(r["default_gain"] for r in rows) > 0.004
    assert min(r["default_gain"] for r in rows) > -0.002


def test_resnet20_weight_matching_lowers_the_barrier_with_repair():
    # A narrow ResNet20 keeps a large barrier when matched alone (Git Re-Basin needs width and REPAIR for
    # ResNets): matching alone moved the midpoint accuracy barrier by -.08 +.01 -.01 | -.15 -.01 -.11 |
    # -.07 -.06 -.03 and the loss barrier by -.38 to +.91 (pairs (0,1) (2,3) (4,5), AVX512 | AVX2 |
    # DEFAULT), no claim. With REPAIR at the midpoint it lowers the barrier against naive and against
    # naive + REPAIR. Measured gains (loss; accuracy):
    # vs naive:          .89 .40 .51 | .56 .55 1.12 | .34 .15 .89;  .256 .181 .176 | .171 .158 .163 | .100 .076 .200
    # vs naive + REPAIR: .33 .35 .47 | .11 .07 .63  | .13 .14 .67;  .161 .182 .162 | .061 .076 .206 | .096 .070 .193
    rows = [measure_weight_resnet(p) for p in seed_pairs(3)]
    margin = {("naive", 0): 0.2, ("naive", 1): 0.06, ("naive_repair", 0): 0.1, ("naive_repair", 1): 0.05}
    for (ref, i), least in margin.items():  # worst means: .46, .125, .27, .114
        gains = [r[ref][i] - r["wm_repair"][i] for r in rows]
        assert mean(gains) > least, (ref, i, gains)
    assert all(r["naive"][i] > r["wm_repair"][i] for r in rows for i in (0, 1))


def test_mlp_activation_matching_lowers_the_barrier():
    rows = [measure_activation_mlp(p) for p in seed_pairs()]
    # measured, pairs (0,1) (2,3) (4,5) (6,7), AVX512 | AVX2 | DEFAULT: matched accuracy barrier
    # .026 .034 .016 .017 | .031 .034 .016 .015 | .019 .034 .016 .018 (naive .33-.37); loss .055-.077
    # (naive 1.01-1.23); worst ratio to naive: 0.10 accuracy, 0.075 loss
    assert all(r["acc"] < r["naive_acc"] / 4 and r["loss"] < r["naive_loss"] / 4 for r in rows)
    assert mean(r["acc"] for r in rows) < 0.06


def measure_data_choice_vgg(seeds) -> dict:
    """Test barriers (midpoint, BN statistics reset) of the default weight matcher and of its data-aware
    tie-break (4 group orders; of those within select.TIE of the best objective, the lowest midpoint loss
    on 2000 training examples kept) on a BN VGG pair."""
    model, sa, sb = trained_pair("vgg_bn", seeds)
    x, y, xt, yt = prb.data.mnist1d()
    spec = model.permutation_spec()
    out = {}
    for name, opts in (("default", {}), ("data", dict(model=model, data=(x[:2000], y[:2000])))):
        res = prb.weight_matching(spec, sa, sb, **opts)
        c = interpolate(model, sa, prb.apply_permutation(spec, res.perms, sb), (xt, yt), ts=[0.0, 0.5, 1.0],
                        buffers="reset", stat_data=x[:1000])
        out[name] = (barrier(c), barrier(c, "accuracy"))
    return out


def test_data_aware_choice_lowers_the_barrier_of_bn_vggs_on_average():
    # Weight matching's objective ties between group orders while the barrier does not: keeping the tied
    # order whose midpoint has the lowest training loss lowers the test barrier. Measured gains (default -
    # data), pairs (0,1) (2,3) (4,5) (6,7), AVX2 | DEFAULT kernels: accuracy .037 .103 -.001 .000 | .165 .089
    # .000 .000 (means .035 | .064); loss .77 1.26 -.004 .000 | .78 .93 .000 .000 (means .51 | .43). Where
    # the best-objective order also has the lowest training loss both keep it and the gain is exactly 0.
    rows = [measure_data_choice_vgg(p) for p in seed_pairs()]
    gains = [(r["default"][0] - r["data"][0], r["default"][1] - r["data"][1]) for r in rows]
    assert mean(g[0] for g in gains) > 0.2, gains
    assert mean(g[1] for g in gains) > 0.015, gains
    assert all(g[0] > -0.1 and g[1] > -0.03 for g in gains), gains  # never clearly worse on one pair
