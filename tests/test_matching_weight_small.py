"""The default's size-dependent choices: restarts (weight.SMALL_RESTARTS on problems of at most
SMALL_SIZE permuted elements: the explicit restarts run there, one run above, an explicit `restarts`
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


@pytest.mark.parametrize("small", [True, False])
def test_default_restarts_follow_the_problem_size(monkeypatch, small):
    spec, a, b = mlps(64)  # 40*64 + 2*64*64 + 64*10 + biases: ~11.5k elements, under SMALL_SIZE
    if not small:
        monkeypatch.setattr(weight, "SMALL_SIZE", 1000)
    default = prb.weight_matching(spec, a, b, seed=3)
    explicit = prb.weight_matching(spec, a, b, seed=3, restarts=weight.SMALL_RESTARTS if small else 1)
    assert same(default, explicit)
    one = prb.weight_matching(spec, a, b, seed=3, restarts=1)
    if small:  # the kept run is the better of seeds 3 and 4
        four = prb.weight_matching(spec, a, b, seed=4, restarts=1)
        assert default.objective[-1] == max(one.objective[-1], four.objective[-1])
    else:
        assert same(default, one)


def test_textbook_never_restarts_on_small_problems():
    spec, a, b = mlps(32)
    tb = prb.weight_matching(spec, a, b, method="textbook", seed=2)
    assert tb.seed == 2 and same(tb, prb.weight_matching(spec, a, b, method="textbook", seed=2, restarts=1))


def test_large_problems_refine_with_the_large_budget(monkeypatch):
    spec, a, b = mlps(96)
    monkeypatch.setattr(weight, "SMALL_SIZE", 0)
    monkeypatch.setattr(weight, "LARGE_SIZE", 1000)  # this problem now counts as large
    large = prb.weight_matching(spec, a, b, seed=1)
    monkeypatch.setattr(weight, "LARGE_SIZE", 1 << 40)
    normal = prb.weight_matching(spec, a, b, seed=1)
    monkeypatch.setattr(weight, "REFINE_BUDGET", weight.LARGE_BUDGET)
    assert same(large, prb.weight_matching(spec, a, b, seed=1))
    assert large.iterations < normal.iterations  # here the budget binds: 21 sweeps vs 25 (same objective)
