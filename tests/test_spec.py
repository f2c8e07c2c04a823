"""PermutationSpec validation, apply/invert/compose, JSON round trip, and caller errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyrebasin as prb
from pyrebasin.spec import Blocked, PermutationSpec, axis_index


def _mlp():
    model = prb.zoo.MLP(40, 16, 2)
    return model, model.permutation_spec(), {k: v.clone() for k, v in model.state_dict().items()}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), backend=st.sampled_from(["native", "reference"]))
def test_apply_then_inverse_is_identity_bitwise(seed, backend):
    if backend == "native" and not prb.native_available():
        return
    model = prb.zoo.Transformer(d_model=16, heads=2, layers=1)
    spec, state = model.permutation_spec(), model.state_dict()
    perms = prb.random_permutation(spec, state, seed)
    with prb.use_backend(backend):
        back = prb.apply_permutation(spec, prb.invert_permutation(perms), prb.apply_permutation(spec, perms, state))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_native_and_reference_agree_on_a_zoo_state_dict():
    model = prb.zoo.ResNet20(1, norm="bn")
    spec, state = model.permutation_spec(), model.state_dict()
    perms = prb.random_permutation(spec, state, 0)
    with prb.use_backend("reference"):
        ref = prb.apply_permutation(spec, perms, state)
    out = prb.apply_permutation(spec, perms, state)
    assert list(out) == list(state)
    assert all(torch.equal(out[k], ref[k]) for k in state)


def test_compose_equals_sequential_application():
    _, spec, state = _mlp()
    p1, p2 = prb.random_permutation(spec, state, 1), prb.random_permutation(spec, state, 2)
    seq = prb.apply_permutation(spec, p2, prb.apply_permutation(spec, p1, state))
    once = prb.apply_permutation(spec, prb.compose_permutations(p1, p2), state)
    assert all(torch.equal(seq[k], once[k]) for k in state)


def test_convention_new_unit_i_takes_old_unit_perm_i():
    _, spec, state = _mlp()
    perms = prb.random_permutation(spec, state, 0)
    new = prb.apply_permutation(spec, perms, state)
    p = perms["P_layers.0"]
    assert torch.equal(new["layers.0.weight"], state["layers.0.weight"][p])
    assert torch.equal(new["layers.1.weight"][:, 3], state["layers.1.weight"][perms["P_layers.1"]][:, p[3]])


def test_input_state_dict_untouched_and_not_aliased():
    _, spec, state = _mlp()
    before = {k: v.clone() for k, v in state.items()}
    new = prb.apply_permutation(spec, prb.random_permutation(spec, state, 0), state)
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert all(new[k].data_ptr() != state[k].data_ptr() for k in state)


def test_blocked_axis_index_matches_manual_expansion():
    perms = {"P": torch.tensor([2, 0, 1]), "Q": torch.tensor([1, 0])}
    idx = axis_index(Blocked((3, 2), ("P", "Q")), perms, 6)
    manual = torch.arange(6).view(3, 2)[perms["P"]][:, perms["Q"]].reshape(-1)
    assert torch.equal(idx, manual)
    assert axis_index(Blocked((3, 2), (None, None)), perms, 6) is None


def test_json_round_trip():
    model = prb.zoo.VGG()
    spec = model.permutation_spec()
    again = PermutationSpec.from_json(spec.to_json())
    assert again.axes_to_perm == spec.axes_to_perm and again.fixed_reasons == spec.fixed_reasons
    assert again.perm_to_axes == spec.perm_to_axes


def test_unit_matrix_rows_are_units():
    model = prb.zoo.VGG()
    spec, state = model.permutation_spec(), model.state_dict()
    w = state["fc1.weight"]
    perm = spec.axes_to_perm["fc1.weight"][1].perms[0]
    m = spec.unit_matrix(w, "fc1.weight", 1, perm)
    assert m.shape == (model.out_channels, w.shape[0] * model.spatial)
    c = 5  # channel c owns columns c*spatial ... (c+1)*spatial-1 of fc1.weight
    assert torch.equal(m[c].view(w.shape[0], model.spatial), w[:, c * model.spatial:(c + 1) * model.spatial])


# --- caller errors: each names the key, axis or perm ---

def test_error_missing_key():
    _, spec, state = _mlp()
    del state["layers.0.bias"]
    with pytest.raises(ValueError, match=r"absent from the state dict: \['layers.0.bias'\]"):
        prb.apply_permutation(spec, {}, state)


def test_error_undeclared_key():
    _, spec, state = _mlp()
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"not declared in the spec.*extra.weight"):
        spec.perm_sizes(state)


def test_error_rank_mismatch():
    _, spec, state = _mlp()
    state["layers.0.bias"] = torch.zeros(16, 1)
    with pytest.raises(ValueError, match=r"spec gives 1 axes for 'layers.0.bias' but its shape is \[16, 1\]"):
        spec.perm_sizes(state)


def test_error_group_sizes_disagree():
    _, spec, state = _mlp()
    state["layers.0.bias"] = torch.zeros(15)
    with pytest.raises(ValueError, match=r"perm 'P_layers.0': 'layers.0.bias' axis 0 has 15 units but 'layers.0.weight' axis 0 has 16"):
        spec.perm_sizes(state)


def test_error_blocked_shape():
    spec = PermutationSpec({"w": (Blocked((3, 4), ("P", None)),)})
    with pytest.raises(ValueError, match=r"'w' axis 0 has size 10 but its Blocked shape \(3, 4\) multiplies to 12"):
        spec.perm_sizes({"w": torch.zeros(10)})


@pytest.mark.parametrize("bad, match", [
    (lambda p: {**p, "P_layers.0": p["P_layers.0"][:-1]}, r"perm 'P_layers.0' has 15 entries but its group has 16"),
    (lambda p: {**p, "P_layers.0": torch.zeros(16, dtype=torch.long)}, r"perm 'P_layers.0' is not a permutation: duplicated indices \[0\]"),
    (lambda p: {**p, "P_layers.0": torch.arange(1, 17)}, r"perm 'P_layers.0' has values outside \[0, 16\)"),
    (lambda p: {**p, "P_layers.0": torch.arange(16.0)}, r"perm 'P_layers.0' must be a 1-D int64 tensor"),
    (lambda p: {k: v for k, v in p.items() if k != "P_layers.1"}, r"permutations missing for perm groups \['P_layers.1'\]"),
    (lambda p: {**p, "P_other": torch.arange(3)}, r"names the spec does not have: \['P_other'\]"),
])
def test_error_bad_permutations(bad, match):
    _, spec, state = _mlp()
    perms = prb.random_permutation(spec, state, 0)
    with pytest.raises(ValueError, match=match):
        prb.apply_permutation(spec, bad(perms), state)


def test_error_bad_entry_type():
    with pytest.raises(TypeError, match=r"spec entry for 'w': expected str, Blocked or None, got 3"):
        PermutationSpec({"w": (3,)})
