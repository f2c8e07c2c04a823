"""The data-aware choice of weight matching (`model=`, `data=`): several group orders run, the kept one has the
lowest midpoint loss on the data (not the highest objective); scores are the midpoint losses `interpolate`
gives (BatchNorm statistics recomputed there); clear errors; inputs untouched."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin.matching import select, weight


def mlp_pair(width=48, seed=0):
    torch.manual_seed(seed)
    model = prb.zoo.MLP(12, width, 3, 5)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed + 1)
    b = {k: v.clone() for k, v in prb.zoo.MLP(12, width, 3, 5).state_dict().items()}
    g = torch.Generator().manual_seed(7)
    data = (torch.randn(300, 12, generator=g), torch.randint(0, 5, (300,), generator=g))
    return model, a, b, data


def midpoint_loss(model, a, b, data, **kw):
    return prb.interpolate(model, a, b, data, ts=[0.5], **kw).values("loss")[0]


def test_the_run_with_the_lowest_midpoint_loss_is_kept(monkeypatch):
    monkeypatch.setattr(select, "TIE", float("inf"))  # every run compared on the data
    model, a, b, data = mlp_pair()
    spec = model.permutation_spec()
    res = prb.weight_matching(spec, a, b, seed=10, model=model, data=data)
    assert sorted(res.scores) == list(range(10, 10 + select.DATA_RESTARTS))
    assert res.seed == min(res.scores, key=res.scores.get)
    alone = {s: prb.weight_matching(spec, a, b, seed=s, restarts=1) for s in res.scores}
    for s, run in alone.items():  # each score is that run's midpoint loss, as interpolate measures it
        aligned = prb.apply_permutation(spec, run.perms, b)
        assert res.scores[s] == pytest.approx(midpoint_loss(model, a, aligned, data), rel=1e-6)
    kept = alone[res.seed]
    assert all(torch.equal(res.perms[p], kept.perms[p]) for p in res.perms) and res.objective == kept.objective
    by_objective = prb.weight_matching(spec, a, b, seed=10, restarts=select.DATA_RESTARTS)
    assert by_objective.objective[-1] == max(r.objective[-1] for r in alone.values())


@pytest.mark.parametrize("tie", [0.0, 0.0025, 0.02])
def test_only_runs_tied_on_the_objective_are_compared(monkeypatch, tie):
    monkeypatch.setattr(select, "TIE", tie)
    model, a, b, data = mlp_pair(width=40, seed=5)
    spec = model.permutation_spec()
    res = prb.weight_matching(spec, a, b, seed=0, model=model, data=data)
    alone = {s: prb.weight_matching(spec, a, b, seed=s, restarts=1).objective[-1] for s in range(select.DATA_RESTARTS)}
    top = max(alone.values())
    assert sorted(res.scores) == [s for s, v in alone.items() if v >= top - tie * abs(top)]
    assert res.seed == min(res.scores, key=res.scores.get) and res.objective[-1] == alone[res.seed]
    if tie == 0.0:  # the plain best-objective choice
        assert res.seed == prb.weight_matching(spec, a, b, seed=0, restarts=select.DATA_RESTARTS).seed


def test_explicit_restarts_win_and_one_restart_is_the_plain_run(monkeypatch):
    monkeypatch.setattr(select, "TIE", float("inf"))
    model, a, b, data = mlp_pair(width=32, seed=3)
    spec = model.permutation_spec()
    two = prb.weight_matching(spec, a, b, seed=0, restarts=2, model=model, data=data)
    assert sorted(two.scores) == [0, 1]
    one = prb.weight_matching(spec, a, b, seed=5, restarts=1, model=model, data=data)
    plain = prb.weight_matching(spec, a, b, seed=5, restarts=1)
    assert list(one.scores) == [5] and all(torch.equal(one.perms[p], plain.perms[p]) for p in one.perms)


def test_batchnorm_nets_are_scored_with_reset_statistics(monkeypatch):
    monkeypatch.setattr(select, "TIE", float("inf"))
    torch.manual_seed(0)
    model = prb.zoo.build("vgg", norm="bn").eval()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    b = {k: v.clone() for k, v in prb.zoo.build("vgg", norm="bn").state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 40, generator=g), torch.randint(0, 10, (64,), generator=g))
    spec = model.permutation_spec()
    res = prb.weight_matching(spec, a, b, restarts=2, model=model, data=data)
    aligned = prb.apply_permutation(spec, res.perms, b)
    reset = midpoint_loss(model, a, aligned, data, buffers="reset", stat_data=data)
    assert res.scores[res.seed] == pytest.approx(reset, rel=1e-5)
    assert reset != pytest.approx(midpoint_loss(model, a, aligned, data), rel=1e-3)  # the choice matters here


def test_inputs_and_the_model_are_not_touched():
    model, a, b, data = mlp_pair(width=24)
    model.train()
    before = [{k: v.clone() for k, v in s.items()} for s in (a, b, model.state_dict())]
    x0 = data[0].clone()
    prb.weight_matching(model.permutation_spec(), a, b, model=model, data=data)
    for s, s0 in zip((a, b, model.state_dict()), before):
        assert all(torch.equal(s[k], s0[k]) for k in s0)
    assert model.training and torch.equal(data[0], x0)


def test_a_certified_run_stops_the_choice():
    model, a, _, data = mlp_pair(width=16)
    spec = model.permutation_spec()
    perm = {p: torch.randperm(n, generator=torch.Generator().manual_seed(1)) for p, n in spec.perm_sizes(a).items()}
    b = prb.apply_permutation(spec, perm, a)
    res = prb.weight_matching(spec, a, b, model=model, data=data)
    assert res.certified and res.scores == {}
    aligned = prb.apply_permutation(spec, res.perms, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)


def test_bad_uses_get_clear_errors():
    model, a, b, data = mlp_pair(width=16)
    spec = model.permutation_spec()
    with pytest.raises(ValueError, match="model and data go together.*only model"):
        prb.weight_matching(spec, a, b, model=model)
    with pytest.raises(ValueError, match="model and data go together.*only data"):
        prb.weight_matching(spec, a, b, data=data)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        prb.weight_matching(spec, a, b, model=a, data=data)
    with pytest.raises(ValueError, match="one split"):
        prb.weight_matching(spec, a, b, model=model, data={"train": data, "test": data})
    bad = (data[0].clone(), data[1])
    bad[0][3, 2] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan|finite"):
        prb.weight_matching(spec, a, b, model=model, data=bad)
    with pytest.raises(ValueError, match="in-memory states"):
        prb.weight_matching(spec, a, b, model=model, data=data, provider=weight.WeightCosts)
