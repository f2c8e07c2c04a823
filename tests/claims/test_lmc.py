"""The linear-mode-connectivity claims on mnist1d-trained pairs, checked over several seed pairs: a
planted permutation shows a naive barrier; alignment lowers it; RESET and REPAIR lower a BN net's."""
import pytest

import pyrebasin as prb
from pyrebasin.lmc import barrier, interpolate
from tests.claims._pairs import mean, mnist1d_splits, seed_pairs, trained, trained_pair

pytestmark = [pytest.mark.slow, pytest.mark.claims]
KINDS = ("endpoint_mean", "linear", "any_chord")


def measure_planted(seed: int) -> dict:
    model, a = trained("mlp", seed)
    spec = model.permutation_spec()
    perms = prb.random_permutation(spec, a, generator=3)
    b = prb.apply_permutation(spec, perms, a)  # the same function, other weights
    data = mnist1d_splits()
    naive = interpolate(model, a, b, data, ts=9)
    aligned = interpolate(model, a, prb.apply_permutation(spec, prb.invert_permutation(perms), b), data, ts=9)
    return {"naive": barrier(naive, split="test"), "aligned": barrier(aligned, split="test"),
            "end_rel_gap": abs(naive.loss["test"][0] - naive.loss["test"][-1]) / naive.loss["test"][0]}


def measure_alignment(seeds) -> dict:
    model, a, b = trained_pair("mlp", seeds)
    spec = model.permutation_spec()
    data = mnist1d_splits()
    naive = interpolate(model, a, b, data, ts=9)
    # the margins below were measured with the textbook loop (the default reaches lower barriers on
    # these pairs: tests/claims/test_matching.py)
    wm = prb.apply_permutation(spec, prb.weight_matching(spec, a, b, method="textbook").perms, b)
    aligned = interpolate(model, a, wm, data, ts=9)
    out = {f"ratio_{k}": barrier(aligned, split="test", kind=k) / barrier(naive, split="test", kind=k) for k in KINDS}
    out.update(acc_naive=barrier(naive, "accuracy", split="test"), acc_aligned=barrier(aligned, "accuracy", split="test"))
    return out


def measure_corrections(seeds) -> dict:
    model, a, b = trained_pair("vgg_bn", seeds)
    spec = model.permutation_spec()
    x, y, xt, yt = prb.data.mnist1d()
    data = {"train": (x[:500], y[:500]), "test": (xt[:500], yt[:500])}
    # Weight matching leaves this BN VGG's plain barrier at or above naive (test loss 1.84-3.11 vs
    # 2.25-2.51 over 4 pairs, AVX512 and AVX2), so the corrections are measured on activation-matched pairs.
    perms = prb.activation_matching(model, model, spec, x[:2000], state_a=a, state_b=b).perms
    b_al = prb.apply_permutation(spec, perms, b)
    stat = x[500:1000]
    plain = interpolate(model, a, b_al, data, ts=5)
    reset = interpolate(model, a, b_al, data, ts=5, buffers="reset", stat_data=stat)
    repaired = interpolate(model, a, b_al, data, ts=5, repair=True, stat_data=stat)
    out = {}
    for split in ("train", "test"):
        out[f"plain_{split}"] = barrier(plain, split=split)
        out[f"reset_ratio_{split}"] = barrier(reset, split=split) / out[f"plain_{split}"]
        out[f"repair_ratio_{split}"] = barrier(repaired, split=split) / out[f"plain_{split}"]
    out["acc_test"] = [barrier(c, "accuracy", split="test") for c in (plain, reset, repaired)]
    return out


def test_planted_permutation_is_flat_and_naive_is_not():
    rows = [measure_planted(s) for s in (0, 2, 4, 6)]
    for r in rows:
        assert r["aligned"] == pytest.approx(0.0, abs=1e-5)  # exact: the planted inverse undoes it
        assert r["end_rel_gap"] < 1e-5  # a permuted net computes the same function
    # measured, seeds 0 2 4 6 (AVX512 | AVX2 | DEFAULT kernels, empty caches): naive test loss barrier
    # 1.149 1.120 1.113 1.238 | 1.131 1.120 1.113 1.255 | 1.130 1.120 1.113 1.255 (min 1.11)
    assert min(r["naive"] for r in rows) > 0.3


def test_alignment_lowers_the_barrier_on_mnist1d():
    rows = [measure_alignment(p) for p in seed_pairs()]
    # measured, pairs (0,1) (2,3) (4,5) (6,7), AVX512 | AVX2 | DEFAULT: aligned / naive test loss barrier
    # (endpoint_mean; linear and any_chord within 0.003 of it) .057 .101 .068 .054 | .062 .101 .068 .054 |
    # .079 .101 .068 .051 (max 0.101); accuracy barrier naive .33-.37 -> aligned .019-.040
    for k in KINDS:
        assert max(r[f"ratio_{k}"] for r in rows) < 0.3, k
        assert mean(r[f"ratio_{k}"] for r in rows) < 0.2, k
    assert all(r["acc_aligned"] < r["acc_naive"] / 3 for r in rows)


def test_reset_and_repair_lower_the_aligned_barrier_of_a_bn_net():
    """Jordan et al. (2023): for BN nets, resetting BN statistics (RESET) lowers the barrier of aligned
    networks, and so does REPAIR, compared with plain aligned interpolation (RESET per pair: on average)."""
    rows = [measure_corrections(p) for p in seed_pairs()]
    # measured, pairs (0,1) (2,3) (4,5) (6,7), AVX512 | AVX2 | DEFAULT, corrected / plain loss barrier:
    # RESET  train .45 .44 .36 .81 | .47 .53 .35 .66 | .49 .51 .29 .89  test .54 .49 .41 .76 | .55 .59 .35 .68 |
    #        .60 .54 .30 .91 (means .50-.59, worst pair .91)
    # REPAIR train .43 .44 .29 .71 | .39 .53 .28 .54 | .41 .52 .25 .76  test .54 .49 .36 .65 | .46 .63 .30 .57 |
    #        .48 .59 .28 .74 (means .44-.52, worst pair .76)
    for split in ("train", "test"):
        for fix in ("reset", "repair"):
            ratios = [r[f"{fix}_ratio_{split}"] for r in rows]
            assert mean(ratios) < 0.75, (fix, split, ratios)
            assert fix == "reset" or max(ratios) < 0.9, (fix, split, ratios)
    # test accuracy barrier plain .37-.64, lowered by RESET .145-.41 (mean .27-.28), by REPAIR .174-.42
    # (mean .28-.30); the (0, 1) pair trained at 2 threads: plain .32, lowered by .078 and .102
    gains = [(plain - reset, plain - repaired) for plain, reset, repaired in (r["acc_test"] for r in rows)]
    assert all(g > 0 for pair in gains for g in pair), gains
    assert mean(g for g, _ in gains) > 0.12 and mean(g for _, g in gains) > 0.12, gains
