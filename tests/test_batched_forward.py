"""pyrebasin.batched_forward: the traced-graph engine equals a loop of functional_call on every zoo
model (odd K, model groups, both convolution strategies, chunk boundaries, BN with combined and RESET
statistics, dict inputs), falls back where it must, and notices a forward that changed."""
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import pyrebasin as prb
from pyrebasin import batched_forward as bf
from pyrebasin._batched_rules import KV, RULES
from pyrebasin.module_state import mode_view
from pyrebasin.repair import ResetCorrection

Z = prb.zoo
SMALL_VGG = {"cfg": (4, "M", 8, "M"), "hidden": 16}
MODELS = {
    "mlp_ln": (lambda: Z.MLP(12, 8, 2, norm="ln"), (12,)),
    "mlp_bn": (lambda: Z.MLP(12, 8, 2, norm="bn"), (12,)),
    "vgg_bn_1d": (lambda: Z.VGG(input_size=16, norm="bn", **SMALL_VGG), (16,)),
    "vgg_plain_1d": (lambda: Z.VGG(input_size=16, norm=None, **SMALL_VGG), (16,)),
    "vgg_bn_2d": (lambda: Z.VGG(in_channels=3, input_size=8, conv_dim=2, norm="bn", **SMALL_VGG), (3, 8, 8)),
    "resnet_bn_1d": (lambda: Z.ResNet20(norm="bn", blocks_per_stage=1), (16,)),
    "resnet_ln_1d": (lambda: Z.ResNet20(norm="ln", blocks_per_stage=1), (16,)),
    "resnet_bn_2d": (lambda: Z.ResNet20(norm="bn", conv_dim=2, in_channels=3, blocks_per_stage=1), (3, 8, 8)),
    "resnet_ln_2d": (lambda: Z.ResNet20(norm="ln", conv_dim=2, in_channels=3, blocks_per_stage=1), (3, 8, 8)),
    "transformer": (lambda: Z.Transformer(seq_len=16, patch=4, d_model=16, heads=2, layers=1), (16,)),
}


def _stacked(model, k, seed=0):
    """K perturbed copies of the model's state (BN variances kept positive), and its fixed tensors."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    p = {n: v + 0.3 * torch.randn(k, *v.shape, generator=g) for n, v in sd.items() if v.is_floating_point()}
    for n in p:
        if n.endswith("running_var"):
            p[n] = p[n].abs() + 0.5
    return p, {n: v for n, v in sd.items() if not v.is_floating_point()}


def _loop(model, p, fixed, x):
    view = mode_view(model)
    k = next(iter(p.values())).shape[0]
    run = (lambda q: functional_call(view, (q, fixed), (), dict(x))) if isinstance(x, dict) else \
        (lambda q: functional_call(view, (q, fixed), (x,)))
    return torch.stack([run({n: v[i] for n, v in p.items()}) for i in range(k)])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_equals_functional_call_on_every_zoo_model(name, monkeypatch):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    p, fixed = _stacked(model, 5)
    x = torch.randn(11, *shape)
    want = _loop(model, p, fixed, x)
    for conv, group_bytes in (("auto", 1 << 30), ("loop", 1 << 30), ("auto", 1)):   # one group / per model
        monkeypatch.setattr(bf, "GROUP_BYTES", group_bytes)
        f = bf.BatchedForward(model, mode_view(model), fixed, conv=conv)
        got = f(p, x)
        assert f.route == "engine", name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not bf.trace_graph(model, mode_view(model), p, fixed, x).fallbacks   # every op has a rule


@pytest.mark.parametrize("name", ["vgg_bn_2d", "resnet_ln_1d", "transformer"])
def test_evaluate_combinations_across_chunk_boundaries_and_interpolate(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    a = model.state_dict()
    torch.manual_seed(1)
    b = build().state_dict()
    x, y = torch.randn(13, *shape), torch.randint(0, 10, (13,))
    c = prb.sample_coefficients(model.permutation_spec(), 5, "uniform", "neuron", seed=3, state=a)
    got = prb.evaluate_combinations(model, a, b, c, (x, y), chunk=2, batch_size=6, return_logits=True)
    states = prb.combine_states(a, b, c)
    fixed = {n: v for n, v in a.items() if not v.is_floating_point()}
    torch.testing.assert_close(got.logits, _loop(model, states, fixed, x), rtol=1e-4, atol=1e-5)
    curve = prb.interpolate(model, a, b, (x, y), 3, chunk=2, batch_size=6)
    lerp = {n: torch.stack([torch.lerp(a[n], b[n], t) for t in (0.0, 0.5, 1.0)]) for n in states}
    want = F.cross_entropy(_loop(model, lerp, fixed, x).transpose(1, 2), y.expand(3, -1), reduction="none").mean(1)
    got_curve = torch.tensor(curve.loss["data"], dtype=torch.float64)
    torch.testing.assert_close(got_curve, want.double(), rtol=1e-4, atol=1e-5)


def test_bn_models_with_combined_and_reset_statistics():
    build, shape = MODELS["resnet_bn_2d"]
    torch.manual_seed(0)
    model = build().eval()
    p, _ = _stacked(model, 3, seed=1)
    a = {n: (p[n][0] if n in p else v) for n, v in model.state_dict().items()}
    b = {n: (p[n][1] if n in p else v) for n, v in model.state_dict().items()}
    x, y = torch.randn(10, *shape), torch.randint(0, 10, (10,))
    lams = [0.2, 0.5, 0.9]
    fixed = {n: v for n, v in a.items() if not v.is_floating_point()}
    mixed = {n: torch.stack([b[n] + lam * (a[n] - b[n]) for lam in lams]) for n in p}
    combined = prb.evaluate_combinations(model, a, b, lams, (x, y), return_logits=True)
    # float32 through a BN ResNet: the engine mixes λ·a + (1-λ)·b in its own order, so logits differ by
    # rounding (measured up to 7.2e-5 on AVX2 kernels, at one of 300 logits; under 1e-5 on AVX-512)
    torch.testing.assert_close(combined.logits, _loop(model, mixed, fixed, x), rtol=1e-4, atol=2e-4)
    reset = prb.evaluate_combinations(model, a, b, lams, (x, y), return_logits=True,
                                      correction=ResetCorrection(model, (x, y), batch_size=5))
    fresh = [prb.reset_bn(model, {**{n: v[i] for n, v in mixed.items()}, **fixed}, (x, y), batch_size=5)
             for i in range(3)]
    want = _loop(model, {n: torch.stack([s[n] for s in fresh]) for n in p}, fixed, x)
    torch.testing.assert_close(reset.logits, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reset.logits, combined.logits, atol=1e-2)   # RESET changed the statistics


class TokenModel(nn.Module):
    """Keyword inputs (input_ids, attention_mask), as language models take them."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln, self.out = nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask):
        h = self.ln(self.emb(input_ids)) * attention_mask.unsqueeze(-1)
        return self.out(h.sum(1) / attention_mask.sum(1, keepdim=True))


def test_dict_inputs_are_keyword_arguments():
    torch.manual_seed(0)
    model = TokenModel()
    p, fixed = _stacked(model, 3)
    mask = torch.ones(9, 6)
    mask[:, 4:] = 0
    x = {"input_ids": torch.randint(0, 20, (9, 6)), "attention_mask": mask}
    f = bf.BatchedForward(model, mode_view(model), fixed)
    torch.testing.assert_close(f(p, x), _loop(model, p, fixed, x), rtol=1e-4, atol=1e-5)
    assert f.route == "engine"


class Reflect(nn.Module):
    """An op without a rule (reflect padding) and a custom module around it."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 3, 3), nn.Linear(3 * 8, 4)

    def forward(self, x):
        return self.fc(torch.flip(self.conv(F.pad(x.unsqueeze(1), (1, 1), mode="reflect")), (-1,)).flatten(1))


class DataDependent(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(8, 4))

    def forward(self, x):
        out = super().forward(x)
        return out if bool(out.sum() > 0) else -out   # fake tensors cannot decide this: no trace


def test_ops_without_rules_fall_back_to_vmap_and_untraceable_forwards_to_the_general_path():
    torch.manual_seed(0)
    model = Reflect()
    p, fixed = _stacked(model, 3)
    x = torch.randn(10, 8)
    f = bf.BatchedForward(model, mode_view(model), fixed)
    torch.testing.assert_close(f(p, x), _loop(model, p, fixed, x), rtol=1e-4, atol=1e-5)
    assert f.route == "engine" and "aten.flip.default" in bf.trace_graph(model, mode_view(model), p, fixed, x).fallbacks
    odd = DataDependent()
    p, fixed = _stacked(odd, 3)
    f = bf.BatchedForward(odd, mode_view(odd), fixed, use_vmap=False)   # vmap cannot branch on data either
    x = torch.randn(5, 8)
    torch.testing.assert_close(f(p, x), _loop(odd, p, fixed, x))
    assert f.route == "loop" and bf.trace_graph(odd, mode_view(odd), p, fixed, x) is None


def test_a_rule_that_disagrees_is_caught_by_the_probe(monkeypatch):
    build, shape = MODELS["resnet_ln_1d"]
    model = build().eval()
    p, fixed = _stacked(model, 3)
    x = torch.randn(12, *shape)
    bf.forget(model)
    monkeypatch.setitem(RULES, torch.ops.aten.relu.default, lambda ctx, op, v: KV(v.t * 2))
    f = bf.BatchedForward(model, mode_view(model), fixed)
    torch.testing.assert_close(f(p, x), _loop(model, p, fixed, x))
    assert f.route == "vmap"


class Steered(nn.Module):
    """A conv net whose activation an attribute chooses: a string (in the trace key) or an object's field
    (not in it: the probe of the next evaluation catches it)."""

    class Config:
        act = "relu"

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 4, 3, padding=1), nn.Linear(4 * 6, 3)
        self.act, self.cfg = "relu", Steered.Config()

    def forward(self, x):
        h = self.conv(x.unsqueeze(1))
        h = torch.relu(h) if self.act == "relu" else torch.tanh(h)
        return self.fc((h if self.cfg.act == "relu" else torch.sigmoid(h)).flatten(1))


@pytest.mark.parametrize("change", ["string", "object field"])
def test_a_forward_steering_attribute_changed_after_the_first_call_is_detected(change):
    m = Steered()
    a = m.state_dict()
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    before = prb.evaluate_combinations(m, a, a, [1.0], (x, y)).loss[0]
    if change == "string":
        m.act = "tanh"
    else:
        m.cfg.act = "sigmoid"
    with torch.no_grad():
        want = F.cross_entropy(m(x), y).item()
    for r in (prb.evaluate_combinations(m, a, a, [1.0], (x, y)).loss[0],
              prb.interpolate(m, a, a, (x, y), 2).loss["data"][0]):
        assert float(r) == pytest.approx(want, rel=1e-5)
        assert float(r) != pytest.approx(float(before), rel=1e-3)
