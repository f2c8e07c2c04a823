"""The default's size-dependent choices: restarts (weight.SMALL_RESTARTS: by the problem's permuted
elements, the first tier it fits; the explicit restarts run there, one run above, an explicit `restarts`
always wins) and the refinement budget (LARGE_BUDGET above LARGE_SIZE elements)."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin.matching import weight


def mlps(width):
    torch.manual_seed(0)
    model = prb.zoo.MLP(40, width, 3, 10)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    b = {k: v.clone() for k, v in prb.zoo.MLP(40, width, 3, 10).state_dict().items()}
    return model.permutation_spec(), a, b


def same(x, y):
    return x.objective == y.objective and x.seed == y.seed and all(torch.equal(x.perms[p], y.perms[p]) for p in x.perms)


@pytest.mark.parametrize("tier", [0, 1, 2])
def test_default_restarts_follow_the_problem_size(monkeypatch, tier):
    spec, a, b = mlps(64)  # 40*64 + 2*64*64 + 64*10: ~11.5k permuted elements, in the first tier (4 orders)
    tiers = {0: weight.SMALL_RESTARTS, 1: ((1000, 4), (1 << 18, 2)), 2: ((1000, 4), (2000, 2))}[tier]
    monkeypatch.setattr(weight, "SMALL_RESTARTS", tiers)
    orders = {0: 4, 1: 2, 2: 1}[tier]
    default = prb.weight_matching(spec, a, b, seed=3)
    assert same(default, prb.weight_matching(spec, a, b, seed=3, restarts=orders))
    alone = [prb.weight_matching(spec, a, b, seed=s, restarts=1) for s in range(3, 3 + orders)]
    assert default.objective[-1] == max(r.objective[-1] for r in alone)  # the best of seeds 3, 4, ...
    assert same(default, next(r for r in alone if r.objective[-1] == default.objective[-1]))


def test_textbook_never_restarts_on_small_problems():
    spec, a, b = mlps(32)
    tb = prb.weight_matching(spec, a, b, method="textbook", seed=2)
    assert tb.seed == 2 and same(tb, prb.weight_matching(spec, a, b, method="textbook", seed=2, restarts=1))


def test_large_problems_refine_with_the_large_budget(monkeypatch):
    spec, a, b = mlps(96)
    monkeypatch.setattr(weight, "SMALL_RESTARTS", ())
    monkeypatch.setattr(weight, "LARGE_SIZE", 1000)  # this problem now counts as large
    large = prb.weight_matching(spec, a, b, seed=1)
    monkeypatch.setattr(weight, "LARGE_SIZE", 1 << 40)
    normal = prb.weight_matching(spec, a, b, seed=1)
    monkeypatch.setattr(weight, "REFINE_BUDGET", weight.LARGE_BUDGET)
    assert same(large, prb.weight_matching(spec, a, b, seed=1))
    assert large.iterations < normal.iterations  # here the budget binds: 21 sweeps vs 25 (same objective)
