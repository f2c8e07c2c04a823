"""Nested permutations (`PermutationSpec.nested`): validation, sizes, block-following checks, random
draws, apply (joint gathers, checked bit for bit against a naive loop), invert/compose, JSON, and
planted nested perms preserving a tiny GQA attention and a tiny stacked-MoE layer."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyrebasin as prb
from pyrebasin.spec import Blocked, PermutationSpec, axis_index


def _naive_apply(spec, perms, state):
    """new[target] = old[source], position by position over each tensor's factor view."""
    out = {}
    for key, t in state.items():
        entries = spec.axes_to_perm[key]
        fshape, owner = [], []   # factor sizes; (perm or None) per factor
        for a, e in enumerate(entries):
            if isinstance(e, Blocked):
                fshape += list(e.shape)
                owner += list(e.perms)
            else:
                fshape.append(t.shape[a])
                owner.append(e)
        x = t.reshape(fshape)
        y = torch.empty_like(x)
        # inner dims: a nested perm after the (single) earlier dim of its outer perm
        outer_dim = {}
        for d, p in enumerate(owner):
            q = spec.nested.get(p)
            earlier = [e for e in range(d) if owner[e] == q] if q else []
            outer_dim[d] = earlier[0] if earlier else None
        for tgt in itertools.product(*[range(n) for n in fshape]):
            src = list(tgt)
            for d, p in enumerate(owner):
                if p is None:
                    continue
                o = outer_dim[d]
                if o is None:
                    src[d] = int(perms[p][tgt[d]])
                else:
                    m = fshape[d]
                    k, g = divmod(int(perms[p][tgt[o] * m + tgt[d]]), m)
                    assert k == int(perms[owner[o]][tgt[o]])
                    src[d] = g
            y[tgt] = x[tuple(src)]
        out[key] = y.reshape(t.shape)
    return out


def _gqa_spec(K, G, d, dv, D, merged_q=True):
    axes = {"q.weight": (Blocked((K, G, d), ("P_kv", "P_q", "P_qk")), None),
            "k.weight": (Blocked((K, d), ("P_kv", "P_qk")), None),
            "v.weight": (Blocked((K, dv), ("P_kv", "P_v")), None),
            "o.weight": (None, Blocked((K, G, dv), ("P_kv", "P_q", "P_v")))}
    if merged_q:
        axes["head_scale"] = ("P_q",)           # one scale per query head: the merged axis (K*G)
    return PermutationSpec(axes, nested={"P_q": "P_kv", "P_qk": "P_kv", "P_v": "P_kv"})


def _gqa_state(K, G, d, dv, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return {"q.weight": r(K * G * d, D), "k.weight": r(K * d, D), "v.weight": r(K * dv, D),
            "o.weight": r(D, K * G * dv), "head_scale": r(K * G)}


def _gqa(state, x, K, G, d, dv):
    B, T, D = x.shape
    q = (x @ state["q.weight"].T).view(B, T, K, G, d) * state["head_scale"].view(K, G, 1)
    k = (x @ state["k.weight"].T).view(B, T, K, d)
    v = (x @ state["v.weight"].T).view(B, T, K, dv)
    scores = torch.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(d)
    attn = scores.softmax(-1)
    o = torch.einsum("bkgts,bskv->btkgv", attn, v).reshape(B, T, K * G * dv)
    return o @ state["o.weight"].T


def _moe_spec():
    return PermutationSpec({"router": ("P_exp", None), "w1": ("P_exp", "P_hid", None),
                            "w2": ("P_exp", None, "P_hid"), "b1": (Blocked((4, 6), ("P_exp", "P_hid")),)},
                           nested={"P_hid": "P_exp"})


def _moe_state(E=4, I=6, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"router": r(E, D), "w1": r(E, I, D), "w2": r(E, D, I), "b1": r(E * I)}


def _moe(state, x, topk=2):
    E, I, _ = state["w1"].shape
    w, idx = (x @ state["router"].T).softmax(-1).topk(topk, -1)
    h = torch.relu(torch.einsum("eid,td->tei", state["w1"], x) + state["b1"].view(E, I))
    y = torch.einsum("edi,tei->ted", state["w2"], h)              # every expert's output
    picked = y.gather(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    return (w.unsqueeze(-1) * picked).sum(1)


def test_sizes_and_random_perms_follow_their_outer():
    K, G, d, dv, D = 2, 3, 4, 5, 6
    spec, state = _gqa_spec(K, G, d, dv, D), _gqa_state(K, G, d, dv, D)
    assert spec.perm_sizes(state) == {"P_kv": 2, "P_q": 6, "P_qk": 8, "P_v": 10}
    perms = prb.random_permutation(spec, state, 3)
    for p, m in (("P_q", G), ("P_qk", d), ("P_v", dv)):
        assert torch.equal(perms[p].view(K, m) // m, perms["P_kv"].view(K, 1).expand(K, m))
    draws = {tuple(prb.random_permutation(spec, state, s)["P_v"].tolist()) for s in range(30)}
    assert len(draws) > 10  # inner orders vary, not only the block order


def test_a_perm_that_breaks_blocks_is_rejected_naming_both():
    K, G, d, dv, D = 2, 3, 4, 5, 6
    spec, state = _gqa_spec(K, G, d, dv, D), _gqa_state(K, G, d, dv, D)
    perms = prb.identity_permutation(spec, state)
    perms["P_v"] = torch.tensor([0, 1, 2, 3, 5, 4, 6, 7, 8, 9])     # unit 5 (block 1) into block 0
    with pytest.raises(ValueError, match=r"perm 'P_v' does not follow its outer perm 'P_kv'.*target block 0"):
        prb.apply_permutation(spec, perms, state)
    perms["P_v"] = torch.arange(10)
    perms["P_kv"] = torch.tensor([1, 0])                             # blocks must move with P_kv
    with pytest.raises(ValueError, match=r"'P_q' does not follow its outer perm 'P_kv'"):
        prb.check_permutations(spec, perms, spec.perm_sizes(state))


@pytest.mark.parametrize("case", ["gqa", "moe", "mixed"])
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), dims=st.tuples(*[st.integers(1, 3)] * 4))
def test_apply_is_bit_exact_against_a_naive_loop(case, seed, dims):
    a, b, c, e = dims
    if case == "gqa":
        spec, state = _gqa_spec(a, b, c, e, 3), _gqa_state(a, b, c, e, 3, torch.float32, seed)
    elif case == "moe":
        spec = PermutationSpec({"w1": ("E", "I", "R"), "w2": ("E", "R", "I"), "r": ("E", None),
                                "s": (Blocked((a, b), ("E", "I")), "R"), "flat": ("I",)}, nested={"I": "E"})
        state = {"w1": torch.randn(a, b, c), "w2": torch.randn(a, c, b), "r": torch.randn(a, e),
                 "s": torch.randn(a * b, c), "flat": torch.randn(a * b)}
    else:  # two nested perms sharing a non-adjacent outer across axes, one inside a Blocked factor
        spec = PermutationSpec({"t": ("Q", Blocked((c, b), ("X", "A")), "B"), "u": ("Q", None),
                                "v": (Blocked((a, e), ("Q", "B")),), "w": ("A",)},
                               nested={"A": "Q", "B": "Q"})
        state = {"t": torch.randn(a, c * b, e), "u": torch.randn(a, 2), "v": torch.randn(a * e),
                 "w": torch.randn(a * b)}
    perms = prb.random_permutation(spec, state, seed)
    got = prb.apply_permutation(spec, perms, state)
    ref = _naive_apply(spec, perms, state)
    assert all(torch.equal(got[k], ref[k]) for k in state)
    inv = prb.invert_permutation(perms)
    prb.check_permutations(spec, inv, spec.perm_sizes(state))      # inverses stay block-following
    back = prb.apply_permutation(spec, inv, got)
    assert all(torch.equal(back[k], state[k]) for k in state)
    other = prb.random_permutation(spec, state, seed + 1)
    both = prb.compose_permutations(perms, other)
    prb.check_permutations(spec, both, spec.perm_sizes(state))     # compositions too
    twice = prb.apply_permutation(spec, other, got)
    once = prb.apply_permutation(spec, both, state)
    assert all(torch.equal(once[k], twice[k]) for k in state)


def test_planted_nested_perms_preserve_a_gqa_attention():
    K, G, d, dv, D = 2, 3, 4, 5, 6
    spec, state = _gqa_spec(K, G, d, dv, D), _gqa_state(K, G, d, dv, D)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    ref = _gqa(state, x, K, G, d, dv)
    for seed in range(3):
        perms = prb.random_permutation(spec, state, seed)
        out = _gqa(prb.apply_permutation(spec, perms, state), x, K, G, d, dv)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    # the per-head value perm is not one of the group's elements when its blocks do not follow P_kv,
    # and the function does change for a perm moving value dims between KV heads:
    bad = prb.identity_permutation(spec, state)
    bad["P_v"] = torch.tensor([5, 1, 2, 3, 4, 0, 6, 7, 8, 9])
    with pytest.raises(ValueError, match="does not follow its outer perm 'P_kv'"):
        prb.apply_permutation(spec, bad, state)
    plain = PermutationSpec(dict(spec.axes_to_perm))   # the same slots read as plain (no nesting)
    with pytest.raises(ValueError, match="perm 'P_q'"):
        plain.perm_sizes(state)


def test_planted_nested_perms_preserve_a_stacked_moe():
    spec, state = _moe_spec(), _moe_state()
    x = torch.randn(9, 5, dtype=torch.float64)
    ref = _moe(state, x)
    for seed in range(3):
        perms = prb.random_permutation(spec, state, seed)
        assert not torch.equal(perms["P_hid"].view(4, 6) % 6, torch.arange(6).expand(4, 6))
        torch.testing.assert_close(_moe(prb.apply_permutation(spec, perms, state), x), ref, atol=1e-12, rtol=0)
    # a per-expert perm that is not shared across experts is exactly what plain perms could not state:
    # with the experts' hidden perm shared, the same draw is not reachable
    shared = PermutationSpec({"router": ("P_exp", None), "w1": ("P_exp", "P_hid", None),
                              "w2": ("P_exp", None, "P_hid"), "b1": (Blocked((4, 6), ("P_exp", "P_hid")),)})
    assert shared.perm_sizes(state)["P_hid"] == 6 and spec.perm_sizes(state)["P_hid"] == 24


def test_validation_errors_name_the_problem():
    axes = {"a": ("Q", "P"), "b": ("P",)}
    with pytest.raises(ValueError, match=r"names perms the spec does not use: \['Z'\]"):
        PermutationSpec(axes, nested={"P": "Z"})
    with pytest.raises(ValueError, match="under itself"):
        PermutationSpec(axes, nested={"P": "P"})
    with pytest.raises(ValueError, match="only one level"):
        PermutationSpec({"a": ("Q", "P", "R")}, nested={"P": "Q", "R": "P"})
    with pytest.raises(TypeError, match="nested must be a dict"):
        PermutationSpec(axes, nested=[("P", "Q")])
    spec = PermutationSpec(axes, nested={"P": "Q"})
    with pytest.raises(ValueError, match=r"blocks of 3 units, so \|P\| = 3 x \|Q\| = 6, but a merged slot has 5"):
        spec.perm_sizes({"a": torch.zeros(2, 3), "b": torch.zeros(5)})
    with pytest.raises(ValueError, match="not a multiple of its outer 'Q'"):
        PermutationSpec({"a": ("Q", None), "b": ("P",)}, nested={"P": "Q"}).perm_sizes(
            {"a": torch.zeros(2, 3), "b": torch.zeros(5)})
    with pytest.raises(ValueError, match="ambiguous"):
        PermutationSpec({"a": ("Q", "Q", "P")}, nested={"P": "Q"}).perm_sizes({"a": torch.zeros(2, 2, 3)})
    with pytest.raises(ValueError, match="inner slot of a perm nested under 'Q'"):
        axis_index(Blocked((3, 2), ("P", None)), {"P": torch.arange(6)}, 6, nested={"P": "Q"})


def test_json_round_trip_restrict_and_unit_matrix():
    spec = _moe_spec()
    back = PermutationSpec.from_json(spec.to_json())
    assert back == spec and back.nested == {"P_hid": "P_exp"}
    old = PermutationSpec({"a": ("P",)}).to_dict()
    assert "nested" not in old and PermutationSpec.from_dict(old).nested == {}
    sub = spec.restrict(["w1", "router"])
    assert sub.nested == {"P_hid": "P_exp"} and spec.restrict(["b1"]).nested == {"P_hid": "P_exp"}
    state = _moe_state()
    u = spec.unit_matrix(state["w2"], "w2", 2, "P_hid")     # rows: (expert, hidden) = the 24 units
    assert u.shape == (24, 5)
    assert torch.equal(u[1 * 6 + 2], state["w2"][1, :, 2])
    perms = prb.random_permutation(spec, state, 0)
    moved = prb.apply_permutation(spec, perms, state)
    assert torch.equal(spec.unit_matrix(moved["w2"], "w2", 2, "P_hid"), u[perms["P_hid"]])


@pytest.mark.parametrize("case", ["gqa", "moe"])
def test_without_nesting_is_the_shared_subgroup_and_lifts_back(case):
    from pyrebasin.nested import lift_shared
    if case == "gqa":
        spec, state = _gqa_spec(2, 3, 4, 5, 6), _gqa_state(2, 3, 4, 5, 6)
    else:
        spec = PermutationSpec({**_moe_spec().axes_to_perm, "flat": ("P_hid",)}, nested={"P_hid": "P_exp"})
        state = {**_moe_state(), "flat": torch.randn(24, dtype=torch.float64)}
    flat = spec.without_nesting(state)
    assert flat.nested == {} and set(flat.perm_names) == set(spec.perm_names)
    sizes, flat_sizes = spec.perm_sizes(state), flat.perm_sizes(state)
    assert all(flat_sizes[p] * sizes[q] == sizes[p] for p, q in spec.nested.items())
    shared = prb.random_permutation(flat, state, 4)
    lifted = lift_shared(spec.nested, shared)
    a, b = prb.apply_permutation(flat, shared, state), prb.apply_permutation(spec, lifted, state)
    assert all(torch.equal(a[k], b[k]) for k in state)
    # weight matching on the plain form recovers a planted shared perm, usable with the nested spec
    got = prb.weight_matching(flat, state, a).perms
    back = prb.apply_permutation(spec, lift_shared(spec.nested, got), b)
    assert all(torch.equal(back[k], state[k]) for k in state)
