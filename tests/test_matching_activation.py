"""Activation matching: planted permutations of every zoo model are recovered exactly from the
activations alone (sites found from the spec; Blocked flatten and attention heads included)."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin.matching import find_sites
from tests.test_matching_weight import MODELS, assert_states_equal, model_state


def inputs(name, n=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (n, 12), "mlp_ln": (n, 12), "mlp_bn": (n, 12), "vgg1d": (n, 16), "vgg2d_ln": (n, 8, 8),
             "resnet20": (n, 40), "resnet20_ln": (n, 8, 8), "transformer": (n, 8)}[name]
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("name", list(MODELS))
def test_planted_permutation_recovered(name):
    model, state_a = model_state(name)
    model.eval()
    spec = model.permutation_spec()
    pi = prb.random_permutation(spec, state_a, generator=11)
    state_b = prb.apply_permutation(spec, pi, state_a)
    before = {k: v.clone() for k, v in state_b.items()}
    x = inputs(name)
    result = prb.activation_matching(model, model, spec, x, state_a=state_a, state_b=state_b, batch_size=128)
    inverse = prb.invert_permutation(pi)
    # Units dead on all the data (ReLU never fires) are invisible to activations: they may swap
    # among themselves. Everything else must be exact, and the aligned B must compute A's function.
    aligned = prb.apply_permutation(spec, result.perms, state_b)
    wrong = sum(int((result.perms[p] != inverse[p]).sum()) for p in pi)
    assert wrong <= 0.1 * sum(len(v) for v in pi.values())
    fa = torch.func.functional_call(model, state_a, (x,))
    fb = torch.func.functional_call(model, aligned, (x,))
    torch.testing.assert_close(fb, fa, rtol=1e-5, atol=1e-5)
    if name in ("mlp", "mlp_ln", "transformer", "vgg2d_ln", "resnet20_ln"):  # no dead units here
        assert wrong == 0
        assert_states_equal(aligned, state_a)
    assert_states_equal(state_b, before)
    assert result.objective[-1] >= result.objective[0]
    # every matched unit correlates perfectly with its partner
    assert result.objective[-1] == pytest.approx(max(result.objective), rel=1e-9)


def test_sites_follow_the_spec():
    model, _ = model_state("transformer")
    sites = find_sites(model, model.permutation_spec())
    by_module = {(s.module, s.where) for s in sites}
    assert ("blocks.0.fc2", "in") in by_module          # MLP units, post-GELU
    assert ("blocks.0.attn.o_proj", "in") in by_module  # heads x v/o dims, jointly
    assert ("blocks.0.attn.q_proj", "out") in by_module  # q/k dims have no consumer: producers
    assert ("head", "in") in by_module                  # the residual stream, read everywhere
    vgg, _ = model_state("vgg1d")
    assert any(s.module == "fc1" and s.where == "in" for s in find_sites(vgg, vgg.permutation_spec()))


def test_iterable_data_and_two_modules():
    model_a, state_a = model_state("mlp", seed=0)
    model_b, state_b = model_state("mlp", seed=1)
    model_a.load_state_dict(state_a)
    model_b.load_state_dict(state_b)
    model_a.eval(), model_b.eval()
    spec = model_a.permutation_spec()
    x = inputs("mlp")
    batches = [(xb, torch.zeros(len(xb))) for xb in x.split(100)]
    r1 = prb.activation_matching(model_a, model_b, spec, batches)
    r2 = prb.activation_matching(model_a, model_b, spec, x, batch_size=100)
    assert all(torch.equal(r1.perms[p], r2.perms[p]) for p in r1.perms)
    assert r1.objective[-1] > r1.objective[0]
    with prb.use_backend("reference"):
        r3 = prb.activation_matching(model_a, model_b, spec, x, batch_size=100)
    assert all(torch.equal(r3.perms[p], r1.perms[p]) for p in r1.perms)


def test_train_mode_model_is_evaluated_in_eval_mode_and_left_as_it_was():
    # (it used to be refused) BatchNorm in train mode would use batch statistics: the result must be
    # the eval-mode one, and the caller's flags and running statistics must not change.
    model, state = model_state("mlp_bn")
    model.load_state_dict(state)
    spec = model.permutation_spec()
    pi = prb.random_permutation(spec, state, generator=3)
    state_b = prb.apply_permutation(spec, pi, state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    result = prb.activation_matching(model, model, spec, inputs("mlp_bn"), state_b=state_b)
    inverse = prb.invert_permutation(pi)
    assert all(torch.equal(result.perms[p], inverse[p]) for p in pi)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    ref = prb.activation_matching(model, model, spec, inputs("mlp_bn"), state_b=state_b)
    assert ref.objective == result.objective and not any(m.training for m in model.modules())


def test_errors():
    model, state = model_state("mlp")
    spec = model.permutation_spec()
    model.eval()
    with pytest.raises(ValueError, match="no batches"):
        prb.activation_matching(model, model, spec, [])
    fake = prb.PermutationSpec({**spec.axes_to_perm, "extra": ("P_ghost",)})
    with pytest.raises(ValueError, match="P_ghost"):
        prb.activation_matching(model, model, fake, inputs("mlp"),
                                state_a={**state, "extra": torch.zeros(3)}, state_b={**state, "extra": torch.zeros(3)})
