"""Every zoo model: a random permutation of its hand-written spec leaves outputs identical, in eval
and in train mode (BatchNorm buffers included), and the spec declares every state-dict key."""
import pytest
import torch
from torch.func import functional_call

import pyrebasin as prb

MODELS = {
    "mlp": lambda: prb.zoo.MLP(40, 33, 3),
    "mlp_bn": lambda: prb.zoo.MLP(40, [17, 23], norm="bn"),
    "mlp_ln": lambda: prb.zoo.MLP(40, 19, 2, norm="ln"),
    "vgg_bn_1d": lambda: prb.zoo.VGG(norm="bn"),
    "vgg_ln_2d": lambda: prb.zoo.VGG(in_channels=1, input_size=8, conv_dim=2, cfg=(8, "M", 16, "M"), norm="ln"),
    "vgg_plain_2d": lambda: prb.zoo.VGG(in_channels=1, input_size=8, conv_dim=2, cfg=(8, 8, "M", 12), norm=None),
    "resnet20_bn_1d": lambda: prb.zoo.ResNet20(1, norm="bn"),
    "resnet20_ln_2d": lambda: prb.zoo.ResNet20(1, norm="ln", conv_dim=2),
    "resnet20_plain_1d": lambda: prb.zoo.ResNet20(1, norm=None, blocks_per_stage=1),
    "transformer": lambda: prb.zoo.Transformer(d_model=32, heads=4, layers=2),
}


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    if "2d" in name:
        return torch.randn(16, 8, 8, generator=g, dtype=torch.float64)
    return torch.randn(16, 40, generator=g, dtype=torch.float64)


def _trained_buffers(model, x):
    """A few train-mode forwards so BatchNorm running stats are not the trivial 0/1."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.1 * torch.randn_like(x))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _forward(model, state, x, train):
    model.train(train)
    state = {k: v.clone() for k, v in state.items()}  # train-mode BN updates its buffers in place
    with torch.no_grad():
        return functional_call(model, state, (x,)), state


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_permutation_leaves_outputs_identical(name, seed):
    torch.manual_seed(seed)
    model = MODELS[name]().double()
    x = _inputs(name)
    state = _trained_buffers(model, x)
    spec = model.permutation_spec()
    perms = prb.random_permutation(spec, state, seed)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = prb.apply_permutation(spec, perms, state)
    for train in (False, True):
        out, new_buffers = _forward(model, state, x, train)
        out_p, new_buffers_p = _forward(model, permuted, x, train)
        torch.testing.assert_close(out_p, out, atol=1e-6, rtol=0)
        if train:  # the updated running stats are the permuted updated stats
            expected = prb.apply_permutation(spec, perms, new_buffers)
            for k in state:
                torch.testing.assert_close(new_buffers_p[k], expected[k], atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_spec_declares_every_key_and_validates(name):
    model = MODELS[name]()
    spec = model.permutation_spec()
    sizes = spec.perm_sizes(model.state_dict())
    assert set(sizes) == set(spec.perm_to_axes)
    # Only the class outputs (and BN counters) stay fixed: every hidden unit is a symmetry.
    for key in spec.fixed:
        assert key.endswith(("num_batches_tracked", ".bias")), key


@pytest.mark.parametrize("name", ["mlp", "resnet20_bn_1d"])
def test_a_wrong_permutation_changes_outputs(name):
    """The check above can fail: permuting only one side of a layer breaks the function."""
    model = MODELS[name]().double()
    x = _inputs(name)
    state = _trained_buffers(model, x)
    spec = model.permutation_spec()
    perms = prb.random_permutation(spec, state, 0)
    permuted = prb.apply_permutation(spec, perms, state)
    first = next(k for k, v in spec.axes_to_perm.items() if v and v[0] is not None)
    permuted[first] = state[first]  # undo one tensor's permutation
    out, _ = _forward(model, state, x, False)
    out_p, _ = _forward(model, permuted, x, False)
    assert (out - out_p).abs().max() > 1e-3


def test_float32_models_are_invariant_too():
    model = prb.zoo.ResNet20(2, norm="bn")
    x = torch.randn(8, 40)
    state = _trained_buffers(model, x)
    spec = model.permutation_spec()
    permuted = prb.apply_permutation(spec, prb.random_permutation(spec, state, 3), state)
    for train in (False, True):
        torch.testing.assert_close(_forward(model, permuted, x, train)[0], _forward(model, state, x, train)[0],
                                   atol=1e-5, rtol=1e-5)


def test_zoo_build_errors():
    with pytest.raises(ValueError, match="unknown zoo architecture 'nope'"):
        prb.zoo.build("nope")
    with pytest.raises(ValueError, match="norm='gn'"):
        prb.zoo.ResNet20(norm="gn")
