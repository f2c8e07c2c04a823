"""git-re-basin interop: its spec format round-trips, kernels are transposed the way flax lays them
out, and weight matching through an imported spec on flax-layout weights finds the same perms."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

import pyrebasin as prb
from pyrebasin.interop import flax_to_torch_state, torch_axis_order, torch_to_flax_state
from pyrebasin.zoo import MLP

GitSpec = namedtuple("GitSpec", "perm_to_axes axes_to_perm")  # git-re-basin's PermutationSpec shape


def _git_mlp_spec(hidden: int) -> dict:
    """git-re-basin's mlp_permutation_spec, written out as its plain data."""
    axes = {"Dense_0/kernel": (None, "P_0")}
    axes |= {f"Dense_{i}/kernel": (f"P_{i - 1}", f"P_{i}") for i in range(1, hidden)}
    axes |= {f"Dense_{i}/bias": (f"P_{i}",) for i in range(hidden)}
    axes |= {f"Dense_{hidden}/kernel": (f"P_{hidden - 1}", None), f"Dense_{hidden}/bias": (None,)}
    p2a: dict = {}
    for k, es in axes.items():
        for a, p in enumerate(es):
            if p is not None:
                p2a.setdefault(p, []).append((k, a))
    return {"perm_to_axes": p2a, "axes_to_perm": axes}


def _names(hidden: int) -> dict:
    # flax "Dense_i" -> the zoo MLP's torch names
    out = {}
    for i in range(hidden + 1):
        torch_name = f"layers.{i}" if i < hidden else "head"
        out[f"Dense_{i}/kernel"], out[f"Dense_{i}/bias"] = f"{torch_name}.weight", f"{torch_name}.bias"
    return out


def test_axis_order_matches_flax_layouts():
    assert torch_axis_order(2) == [1, 0]            # Dense [in, out] -> Linear [out, in]
    assert torch_axis_order(4) == [3, 2, 0, 1]      # HWIO -> OIHW
    w = torch.randn(5, 3, 2, 4)                     # torch OIHW
    flax = torch_to_flax_state({"c.weight": w})["c/kernel"]
    assert flax.shape == (2, 4, 3, 5)
    assert torch.equal(torch.as_tensor(flax), w.permute(2, 3, 1, 0))
    assert torch.equal(flax_to_torch_state({"c": {"kernel": flax}})["c.weight"], w)


@pytest.mark.parametrize("norm", [None, "ln", "bn"])
def test_round_trip(norm):
    spec = MLP(12, 16, 3, 5, norm=norm).permutation_spec()
    exported = spec.to_git_rebasin()
    assert set(exported) >= {"perm_to_axes", "axes_to_perm"}
    assert all("/" in k or "." not in k for k in exported["axes_to_perm"])
    back = prb.PermutationSpec.from_git_rebasin(exported)
    assert back == spec
    # without the key_map it wrote, the default name rules still give the torch names back
    bare = {"perm_to_axes": exported["perm_to_axes"], "axes_to_perm": exported["axes_to_perm"]}
    assert prb.PermutationSpec.from_git_rebasin(bare).axes_to_perm == spec.axes_to_perm


def test_import_of_git_rebasin_mlp_spec_and_matching_on_flax_layout():
    hidden = 3
    git = _git_mlp_spec(hidden)
    torch.manual_seed(0)
    a, b = MLP(12, 16, hidden, 5), MLP(12, 16, hidden, 5)
    sa, sb = ({k: v.detach() for k, v in m.state_dict().items()} for m in (a, b))
    imported = prb.PermutationSpec.from_git_rebasin(GitSpec(git["perm_to_axes"], git["axes_to_perm"]),
                                                    key_map=_names(hidden))
    zoo = a.permutation_spec()
    assert zoo.axes_to_perm == {k: tuple(e and e.replace("P_", "P_layers.") for e in es)
                                for k, es in imported.axes_to_perm.items()}
    torch_perms = prb.weight_matching(imported, sa, sb, seed=0).perms
    # the same weights in flax layout, matched through the spec as git-re-basin wrote it
    inverse = {v: k for k, v in _names(hidden).items()}
    fa = {k: torch.as_tensor(v) for k, v in torch_to_flax_state(sa, key_map=inverse).items()}
    fb = {k: torch.as_tensor(v) for k, v in torch_to_flax_state(sb, key_map=inverse).items()}
    assert fa["Dense_0/kernel"].shape == (12, 16)
    flax_spec = prb.PermutationSpec.from_git_rebasin(git, layout="flax")
    flax_perms = prb.weight_matching(flax_spec, fa, fb, seed=0).perms
    assert set(flax_perms) == set(torch_perms) == {"P_0", "P_1", "P_2"}
    assert any(not torch.equal(p, torch.arange(16)) for p in torch_perms.values())
    for p in torch_perms:
        assert torch.equal(flax_perms[p], torch_perms[p]), p
    # and the flax params load back into the torch model exactly
    back = flax_to_torch_state(torch_to_flax_state(sa, key_map=inverse, nested=True), key_map=_names(hidden))
    assert all(torch.equal(back[k], sa[k]) for k in sa)


def test_bare_perm_to_axes_needs_ranks_and_bad_input_is_named():
    git = _git_mlp_spec(1)
    with pytest.raises(ValueError, match="params="):
        prb.PermutationSpec.from_git_rebasin(git["perm_to_axes"])
    params = {"Dense_0": {"kernel": torch.zeros(4, 6).numpy(), "bias": torch.zeros(6).numpy()},
              "Dense_1": {"kernel": torch.zeros(6, 3).numpy(), "bias": torch.zeros(3).numpy()}}
    spec = prb.PermutationSpec.from_git_rebasin(git["perm_to_axes"], params=params)
    assert spec.axes_to_perm["Dense_1.weight"] == (None, "P_0")
    assert spec.axes_to_perm["Dense_1.bias"] == (None,)
    bad = {"perm_to_axes": git["perm_to_axes"], "axes_to_perm": dict(git["axes_to_perm"], **{"Dense_0/bias": (None,)})}
    with pytest.raises(ValueError, match="disagree"):
        prb.PermutationSpec.from_git_rebasin(bad)
    with pytest.raises(ValueError, match="layout="):
        prb.PermutationSpec.from_git_rebasin(git, layout="jax")
    with pytest.raises(TypeError, match="spec must be"):
        prb.PermutationSpec.from_git_rebasin(42)
    blocked = prb.PermutationSpec({"w": (prb.Blocked((2, 3), ("P", None)), None)})
    with pytest.raises(ValueError, match="Blocked"):
        blocked.to_git_rebasin()
    clash = prb.PermutationSpec({"a.weight": ("P", None), "a.kernel": ("P", None)})
    with pytest.raises(ValueError, match="both become the flax key"):
        clash.to_git_rebasin()


def test_conv_kernels_follow_hwio():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    spec = prb.PermutationSpec({"0.weight": ("P", None, None, None), "0.bias": ("P",),
                                "2.weight": (None, "P", None, None), "2.bias": (None,)})
    git = spec.to_git_rebasin()
    assert git["axes_to_perm"]["0/kernel"] == (None, None, None, "P")    # HWIO: out last
    assert git["axes_to_perm"]["2/kernel"] == (None, None, "P", None)    # in second to last
    state = {k: v.detach() for k, v in model.state_dict().items()}
    flax = {k: torch.as_tensor(v) for k, v in torch_to_flax_state(state).items()}
    perm = {"P": torch.randperm(8, generator=torch.Generator().manual_seed(0))}
    flax_spec = prb.PermutationSpec.from_git_rebasin(git, layout="flax")
    permuted_flax = prb.apply_permutation(flax_spec, perm, flax)
    permuted = prb.apply_permutation(spec, perm, state)
    back = flax_to_torch_state(permuted_flax, key_map=git["key_map"])
    assert all(torch.equal(back[k], permuted[k]) for k in state)
