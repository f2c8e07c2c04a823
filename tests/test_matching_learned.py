"""Learned matching (straight-through estimator, Sinkhorn): valid and replayable permutations on zoo
specs, inputs untouched, a planted permutation kept, soft permutation = apply_permutation on hard ones."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin.matching import soft_permute

MATCHERS = {"ste": prb.ste_matching, "sinkhorn": prb.sinkhorn_matching}


def tiny(arch: str, seed: int):
    torch.manual_seed(seed)
    if arch == "mlp":
        return prb.zoo.build("mlp", width=16, depth=2)
    return prb.zoo.build("vgg", cfg=(4, "M", 8, "M"), hidden=16)


def data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def pair(arch: str):
    model = tiny(arch, 0)
    return model, model.permutation_spec(), {k: v.clone() for k, v in model.state_dict().items()}, \
        {k: v.clone() for k, v in tiny(arch, 1).state_dict().items()}


@pytest.mark.parametrize("arch", ["mlp", "vgg"])
@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_valid_and_replayable_permutations(arch, name):
    model, spec, sa, sb = pair(arch)
    sizes = spec.perm_sizes(sb)
    runs = [MATCHERS[name](model, spec, sa, sb, data(), steps=4, batch_size=32, seed=3) for _ in range(2)]
    for r in runs:
        assert set(r.perms) == set(sizes)
        for p, n in sizes.items():
            assert torch.equal(torch.sort(r.perms[p]).values, torch.arange(n)), p
        assert len(r.objective) == 4 and all(torch.isfinite(torch.tensor(r.objective)))
    assert all(torch.equal(runs[0].perms[p], runs[1].perms[p]) for p in sizes)
    assert runs[0].objective == runs[1].objective


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_inputs_untouched(name):
    model, spec, sa, sb = pair("vgg")
    model.train()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    copies = [{k: v.clone() for k, v in s.items()} for s in (sa, sb)]
    x, y = data()
    MATCHERS[name](model, spec, sa, sb, (x, y), steps=3, batch_size=32)
    assert all(m.training for m in model.modules())
    for before, after in zip(copies + [own], [sa, sb, model.state_dict()]):
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["mlp", "vgg"])
@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_planted_permutation_is_kept(arch, name):
    # B = π(A): weight matching finds π⁻¹ exactly, the midpoint is A itself, and a few small steps
    # of either learner must not leave that optimum
    model, spec, sa, _ = pair(arch)
    planted = prb.random_permutation(spec, sa, 5)
    sb = prb.apply_permutation(spec, planted, sa)
    r = MATCHERS[name](model, spec, sa, sb, data(), steps=3, batch_size=32, lr=1e-4, init="weight")
    back = prb.apply_permutation(spec, r.perms, sb)
    assert all(torch.equal(back[k], sa[k]) for k in sa)


def test_soft_permute_of_permutation_matrices_is_apply_permutation():
    _, spec, sa, _ = pair("vgg")  # Blocked flatten axis and a weight with two permuted axes
    perms = prb.random_permutation(spec, sa, 2)
    mats = {p: torch.eye(len(v))[v] for p, v in perms.items()}
    soft, hard = soft_permute(spec, mats, sa), prb.apply_permutation(spec, perms, sa)
    for k in sa:
        torch.testing.assert_close(soft[k], hard[k], rtol=0, atol=1e-6)


def test_ste_from_identity_starts_at_the_naive_midpoint():
    # init=None: W̃ = θ_B, its projection is the identity, so the first loss is the naive midpoint's
    model, spec, sa, sb = pair("mlp")
    x, y = data()
    r = prb.ste_matching(model, spec, sa, sb, (x, y), steps=1, batch_size=None, init=None, keep="final")
    mid = prb.module_state.lerp_state(sa, sb, 0.5)
    want = torch.nn.functional.cross_entropy(torch.func.functional_call(model, mid, (x,)), y)
    assert r.objective[0] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("name", sorted(MATCHERS))
@pytest.mark.parametrize("option,value", [("steps", 0), ("steps", 2.5), ("lr", 0.0), ("lr", float("nan")),
                                          ("lr", -1.0), ("batch_size", 0), ("seed", "a"), ("init", "activation"),
                                          ("keep", "last"), ("check_every", 0)])
def test_bad_options_name_the_argument(name, option, value):
    model, spec, sa, sb = pair("mlp")
    with pytest.raises(ValueError, match=option):
        MATCHERS[name](model, spec, sa, sb, data(), **{"steps": 2, option: value})


@pytest.mark.parametrize("option,value", [("tau", 0.0), ("tau", float("inf")), ("n_iter", 0)])
def test_bad_sinkhorn_options_name_the_argument(option, value):
    model, spec, sa, sb = pair("mlp")
    with pytest.raises(ValueError, match=option):
        prb.sinkhorn_matching(model, spec, sa, sb, data(), steps=2, **{option: value})


def test_bad_inputs():
    model, spec, sa, sb = pair("mlp")
    with pytest.raises(ValueError, match="labels"):
        prb.ste_matching(model, spec, sa, sb, data()[0], steps=2)
    with pytest.raises(TypeError, match="one-shot"):
        prb.ste_matching(model, spec, sa, sb, iter([data()]), steps=2)
    with pytest.raises(ValueError, match="state_b"):
        prb.sinkhorn_matching(model, spec, sa, {k: v[..., :1] for k, v in sb.items()}, data(), steps=2)
    with pytest.raises(TypeError, match="init"):
        prb.ste_matching(model, spec, sa, sb, data(), steps=2, init=3)


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_best_is_no_worse_than_the_start_on_the_data(name):
    # keep="best" checks the start too: the returned perms' midpoint loss on the data is at most the
    # start's (here weight matching's), whatever the learning rate does
    model, spec, sa, sb = pair("mlp")
    x, y = data()
    r = MATCHERS[name](model, spec, sa, sb, (x, y), steps=6, batch_size=32, lr=1.0, check_every=2)

    def loss(perms):
        mid = prb.module_state.lerp_state(sa, prb.apply_permutation(spec, perms, sb), 0.5)
        return float(torch.nn.functional.cross_entropy(torch.func.functional_call(model, mid, (x,)), y))
    assert loss(r.perms) <= loss(prb.weight_matching(spec, sa, sb).perms) + 1e-5


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_any_data_convention(name):
    # a list of batches and a DataLoader are read as they come (their order is the caller's)
    model, spec, sa, sb = pair("mlp")
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    runs = [MATCHERS[name](model, spec, sa, sb, d, steps=5, seed=1)
            for d in ([(x[:48], y[:48]), (x[48:], y[48:])], loader, loader)]
    assert all(len(r.objective) == 5 for r in runs)
    assert all(torch.equal(runs[1].perms[p], runs[2].perms[p]) for p in runs[1].perms)
