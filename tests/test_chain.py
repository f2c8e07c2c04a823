"""pyrebasin._chain: which forwards are recognised as Linear/activation chains, and the direct batched
forward against vmap(functional_call) (also through evaluate_combinations)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pyrebasin as prb
from pyrebasin import _chain, batched_forward, evaluation
from pyrebasin._chain import linear_chain


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(x + F.relu(self.a(x)))


class FunctionalMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.sigmoid(self.a(torch.flatten(x, 1))).tanh())


class ExtraBuffer(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(8, 3))
        self.register_buffer("scale", torch.ones(3))  # not read by forward, but part of the state


def _stack(model, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(k, *v.shape, generator=g) for n, v in model.state_dict().items()}


def test_recognised_chains():
    steps = linear_chain(prb.zoo.MLP(40, [33, 17], 2)).steps
    assert [s[0] for s in steps] == ["flatten", "linear", "relu", "linear", "relu", "linear"]
    seq = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Dropout(0.1), nn.ReLU(inplace=True),
                        nn.Linear(7, 5, bias=False))
    assert linear_chain(seq).steps == (("flatten",), ("linear", "1.weight", "1.bias"), ("tanh",), ("relu",),
                                       ("linear", "5.weight", None))
    assert [s[0] for s in linear_chain(FunctionalMLP()).steps] == ["flatten", "linear", "sigmoid", "tanh", "linear"]


@pytest.mark.parametrize("model", [prb.zoo.MLP(40, 8, 2, norm="ln"), prb.zoo.MLP(40, 8, 2, norm="bn"), Residual(),
                                   ExtraBuffer(), nn.Sequential(nn.Linear(8, 4), nn.GELU()), nn.Sequential(nn.ReLU()),
                                   prb.zoo.build("vgg")])
def test_other_forwards_are_not_chains(model):
    assert linear_chain(model) is None


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("group_bytes", [1, 1 << 30])
def test_forward_matches_vmap_functional_call(k, group_bytes, monkeypatch):
    monkeypatch.setattr(_chain, "_GROUP_BYTES", group_bytes)   # one model per group, or all at once
    for model in (nn.Sequential(nn.ReLU(), nn.Linear(8, 7), nn.Sigmoid(), nn.Linear(7, 3, bias=False)),
                  FunctionalMLP(), prb.zoo.MLP(8, [6, 5], 2, classes=4)):
        params = _stack(model, k)
        x = torch.randn(11, 8)
        x0 = x.clone()
        want = torch.func.vmap(lambda p, x: torch.func.functional_call(model, p, (x,)), in_dims=(0, None))(params, x)
        got = linear_chain(model).forward(params, x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(x, x0)   # the leading ReLU must not write into the caller's input


def test_hooked_models_take_the_general_path():
    seq = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    handle = seq[1].register_forward_hook(lambda mod, inp, out: out * 2)
    assert linear_chain(seq) is None
    handle.remove()
    assert linear_chain(seq) is not None


def test_forward_rejects_non_matrix_inputs():
    chain = linear_chain(nn.Sequential(nn.Linear(8, 3)))
    assert not chain.accepts(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"\[2, 3, 8\]"):
        chain.forward(_stack(nn.Sequential(nn.Linear(8, 3)), 2), torch.randn(2, 3, 8))


@pytest.mark.parametrize("gran", ["element", "neuron", "global"])
def test_evaluate_combinations_chain_equals_general_path(gran, monkeypatch):
    torch.manual_seed(0)
    m = prb.zoo.MLP(40, 24, 3)
    a = m.state_dict()
    torch.manual_seed(1)
    b = prb.zoo.MLP(40, 24, 3).state_dict()
    x, y = torch.randn(37, 40), torch.randint(0, 10, (37,))
    c = prb.sample_coefficients(m.permutation_spec(), 6, "uniform(-0.3, 1.3)", gran, seed=5, state=a)
    fast = prb.evaluate_combinations(m, a, b, c, (x, y), chunk=4, batch_size=16, return_logits=True)
    monkeypatch.setattr(batched_forward, "linear_chain", lambda model: None)
    monkeypatch.setattr(batched_forward, "trace_graph", lambda *a: None)   # the vmap path
    slow = prb.evaluate_combinations(m, a, b, c, (x, y), chunk=4, batch_size=16, return_logits=True)
    torch.testing.assert_close(fast.logits, slow.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast.accuracy, slow.accuracy) or (fast.accuracy - slow.accuracy).abs().max() <= 1 / 37


def test_loss_and_correct_fast_layout_equals_general_path():
    # The chain hands back [K, C, B] memory seen as [K, B, C]; its loss/argmax shortcut must match
    # the general computation, ties included (argmax takes the first maximum).
    g = torch.Generator().manual_seed(0)
    k, b, c = 5, 37, 7
    logits = torch.randn(k, c, b, generator=g)
    logits[0] = 0.0                                   # every class tied
    logits[1, 3:5] = logits[1, 3:5].amax(0)           # classes 3 and 4 tied
    y = torch.randint(0, c, (b,), generator=g)
    y[:7] = torch.arange(7)
    fast = evaluation.loss_and_correct(logits.transpose(1, 2), y)
    slow = evaluation.loss_and_correct(logits.transpose(1, 2).contiguous(), y)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(fast[1], slow[1])
    assert int(fast[1][0]) == int((y == 0).sum())
