"""pyrebasin.combine: closed-form moments of the combinations, layouts per granularity, replay, and
evaluate_combinations against a plain loop of load_state_dict + forward."""
import math

import pytest
import torch

import pyrebasin as prb
from pyrebasin.combine import Distribution, coefficient_layout


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    m = prb.zoo.MLP(**{"in_features": 40, "width": 32, "depth": 2, **kw})
    a = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(seed + 1)
    b = {k: v.clone() for k, v in prb.zoo.MLP(**{"in_features": 40, "width": 32, "depth": 2, **kw}).state_dict().items()}
    return m, a, b


def _sq(x, y):
    return sum(float((x[k].double() - y[k].double()).pow(2).sum()) for k in x)


@pytest.mark.parametrize("dist,ratio_ab,ratio_b", [("uniform", 1 / 6, 1 / 3), ("bernoulli(0.5)", 1 / 2, 1 / 2)])
def test_closed_form_distances(dist, ratio_ab, ratio_b):
    # Element-wise λ, μ iid: E‖Θ_λ − Θ_μ‖² = ‖Δ‖² E(λ−μ)², E‖Θ_λ − Θ_B‖² = ‖Δ‖² Eλ².
    _, a, b = _pair()
    delta2 = _sq(a, b)
    c = prb.sample_coefficients(a, 400, dist, "element", seed=1)
    s = prb.combine_states(a, b, c)
    pairs = [_sq({k: v[i] for k, v in s.items()}, {k: v[i + 1] for k, v in s.items()}) for i in range(0, 400, 2)]
    to_b = [_sq({k: v[i] for k, v in s.items()}, b) for i in range(400)]
    assert abs(sum(pairs) / len(pairs) / delta2 - ratio_ab) < 0.02 * ratio_ab
    assert abs(sum(to_b) / len(to_b) / delta2 - ratio_b) < 0.02 * ratio_b
    mean = {k: v.double().mean(0) for k, v in s.items()}
    mid = {k: 0.5 * (a[k].double() + b[k].double()) for k in s}
    assert _sq(mean, mid) < 0.01 * delta2


def test_granularity_layouts_share_coefficients():
    m, a, b = _pair(norm="bn")
    spec = m.permutation_spec()
    one = {k: torch.ones_like(v) if v.is_floating_point() else v for k, v in a.items()}
    zero = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in a.items()}
    lam = {g: prb.combine_states(one, zero, prb.sample_coefficients(spec, 3, "uniform", g, seed=4, state=a))
           for g in ("element", "neuron", "layer", "global")}
    el, ne, la, gl = (lam[g] for g in ("element", "neuron", "layer", "global"))
    assert len({float(v) for t in gl.values() for v in t[0].flatten()}) == 1
    assert torch.equal(la["layers.0.weight"][:, :1, :1].expand_as(la["layers.0.weight"]), la["layers.0.weight"])
    assert torch.equal(la["layers.0.weight"][:, 0, 0], la["layers.0.bias"][:, 0])
    assert not torch.equal(la["layers.0.weight"][:, 0, 0], la["layers.1.weight"][:, 0, 0])
    # neuron: unit i of P_layers.0 owns row i of layers.0.weight, bias i, BN params and buffers i.
    row = ne["layers.0.weight"][:, :, 0]
    assert torch.equal(ne["layers.0.weight"], row[:, :, None].expand_as(ne["layers.0.weight"]))
    for key in ("layers.0.bias", "norms.0.weight", "norms.0.bias", "norms.0.running_mean", "norms.0.running_var"):
        assert torch.equal(ne[key], row), key
    # the head's columns belong to the last hidden units (its first permuted axis)
    assert torch.equal(ne["head.weight"][:, 0, :], ne["layers.1.bias"])
    assert len(torch.unique(el["layers.0.weight"][0])) > 1000
    assert "norms.0.num_batches_tracked" not in el
    lay = coefficient_layout(a, "neuron", spec)
    assert lay.num_coefficients == 32 + 32 + 1  # two perm groups + the fixed head bias


def test_sample_regenerates_alone_and_matches_the_op():
    _, a, b = _pair()
    c = prb.sample_coefficients(a, 6, "beta(0.5, 0.5)", "element", seed=9)
    s = prb.combine_states(a, b, c)
    lam4 = c.sample(4)
    for k in s:
        want = (b[k] + lam4[k].float() * (a[k] - b[k]))
        assert torch.equal(s[k][4], want), k
    shifted = prb.sample_coefficients(a, 2, "beta(0.5, 0.5)", "element", seed=9, sample_begin=4)
    assert torch.equal(shifted.values()[0], c.values(4, 5)[0])


def test_distribution_parse():
    assert Distribution.parse("uniform(-0.5, 1.5)") == Distribution("uniform", (-0.5, 1.5))
    assert Distribution.parse("gaussian(0.5, 0.2, clip)").params == (0.5, 0.2, 0.0, 1.0)
    assert Distribution.parse("gaussian(0.5,0.2)").params[2:] == (-math.inf, math.inf)
    assert Distribution.parse(0.3) == Distribution("constant", (0.3,))
    assert str(Distribution.parse("bernoulli")) == "bernoulli(0.5)"
    for bad in ("cauchy(0,1)", "uniform(1, 0)", "beta(0, 1)", "bernoulli(2)", "uniform(a, b)"):
        with pytest.raises(ValueError):
            Distribution.parse(bad)


def test_sample_coefficients_errors():
    m, a, _ = _pair()
    with pytest.raises(ValueError, match="PermutationSpec"):
        prb.sample_coefficients(a, 2, "uniform", "neuron")
    with pytest.raises(ValueError, match="state="):
        prb.sample_coefficients(m.permutation_spec(), 2)
    with pytest.raises(ValueError, match="granularity"):
        prb.sample_coefficients(a, 2, "uniform", "channel")


@pytest.mark.parametrize("norm", [None, "bn", "ln"])
def test_evaluate_matches_loop(norm):
    m, a, b = _pair(norm=norm)
    m.train()
    x, y = torch.randn(50, 40), torch.randint(0, 10, (50,))
    c = prb.sample_coefficients(m.permutation_spec(), 7, "uniform(-0.2, 1.2)", "neuron", seed=2, state=a)
    a0 = {k: v.clone() for k, v in a.items()}
    mod0 = {k: v.clone() for k, v in m.state_dict().items()}
    res = prb.evaluate_combinations(m, a, b, c, (x, y), chunk=3, batch_size=16, return_logits=True)
    assert m.training and all(torch.equal(a[k], a0[k]) for k in a)
    assert all(torch.equal(v, mod0[k]) for k, v in m.state_dict().items())
    stacked = prb.combine_states(a, b, c)
    probe = prb.zoo.MLP(40, 32, 2, norm=norm).eval()
    for k in range(7):
        probe.load_state_dict({key: stacked[key][k] if key in stacked else a[key] for key in a})
        loss, acc = prb.train.evaluate(probe, x, y)
        assert abs(float(res.loss[k]) - loss) < 1e-5 and abs(float(res.accuracy[k]) - acc) < 1e-9
        torch.testing.assert_close(res.logits[k], probe(x), rtol=1e-5, atol=1e-5)
    assert res.chunk == 3 and res.chunk_param_bytes == 3 * sum(v.numel() * 4 for v in stacked.values()) // 7


def test_evaluate_constant_path_endpoints_and_explicit():
    m, a, b = _pair()
    x, y = torch.randn(40, 40), torch.randint(0, 10, (40,))
    res = prb.evaluate_combinations(m, a, b, [1.0, 0.0, 0.5], (x, y))
    for k, st in ((0, a), (1, b)):
        m.load_state_dict(st)
        assert abs(float(res.loss[k]) - prb.train.evaluate(m, x, y)[0]) < 1e-5
    lam = {k: torch.full((3,), t) for k, t in zip(a, [0.5] * len(a)) if a[k].is_floating_point()}
    explicit = prb.evaluate_combinations(m, a, b, lam, [(x[:20], y[:20]), (x[20:], y[20:])])
    assert abs(float(explicit.loss[0]) - float(res.loss[2])) < 1e-5
    const = prb.evaluate_combinations(m, a, b, prb.sample_coefficients(a, 1, 0.5, "global"), (x, y))
    assert abs(float(const.loss[0]) - float(res.loss[2])) < 1e-5


def test_evaluate_errors():
    m, a, b = _pair()
    x, y = torch.randn(4, 40), torch.randint(0, 10, (4,))
    c = prb.sample_coefficients(a, 2)
    with pytest.raises(ValueError, match="keys"):
        prb.evaluate_combinations(m, a, {k: v for k, v in b.items() if k != "head.bias"}, c, (x, y))
    with pytest.raises(ValueError, match="chunk"):
        prb.evaluate_combinations(m, a, b, c, (x, y), chunk=0)
    with pytest.raises(TypeError, match="data"):
        prb.evaluate_combinations(m, a, b, c, 3)
    _, a2, b2 = _pair(width=16)
    with pytest.raises(ValueError, match="another state dict"):
        prb.combine_states(a2, b2, c)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("arch", ["vgg", "resnet20", "transformer"])
def test_evaluate_zoo_architectures(arch):
    # conv + BatchNorm (eval-mode buffers combined too) and attention run under vmap like the MLP.
    torch.manual_seed(0)
    m = prb.zoo.build(arch)
    a = m.state_dict()
    torch.manual_seed(1)
    b = prb.zoo.build(arch).state_dict()
    x, y = torch.randn(6, 40), torch.randint(0, 10, (6,))
    c = prb.sample_coefficients(m.permutation_spec(), 2, "beta(0.5, 0.5)", "neuron", seed=0, state=a)
    res = prb.evaluate_combinations(m, a, b, c, (x, y), chunk=2)
    st = prb.combine_states(a, b, c, 1, 2)
    probe = prb.zoo.build(arch)
    probe.load_state_dict({k: st[k][0] if k in st else a[k] for k in a})
    assert abs(float(res.loss[1]) - prb.train.evaluate(probe, x, y)[0]) < 1e-4
