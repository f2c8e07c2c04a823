"""Matching nested permutations (GQA heads per KV group, stacked MoE experts): the family solver against
brute force over the wreath group, planted recovery by weight and activation matching (aligned B equal to A
bit for bit), the never-decreasing objective, and nested vs shared specs on a noisy pair."""
import itertools
import math

import pytest
import torch
from torch import nn

import pyrebasin as prb
from pyrebasin.matching.nested import solve_family, solve_within_blocks, source_ordered
from pyrebasin.matching.nested_weight import NestedCosts, _Problem, _step, nested_descent
from pyrebasin.spec import Blocked, PermutationSpec


def _brute_family(own, kids, k):
    best = -math.inf
    for q in itertools.permutations(range(k)):
        v = float(sum(own[a, q[a]] for a in range(k)))
        for c in kids.values():
            m = c.shape[0] // k
            for a in range(k):
                blk = c[a * m:(a + 1) * m, q[a] * m:(q[a] + 1) * m]
                v += max(float(sum(blk[i, s[i]] for i in range(m))) for s in itertools.permutations(range(m)))
        best = max(best, v)
    return best


@pytest.mark.parametrize("brute_max", [0, 5])
def test_family_solver_is_the_optimum_over_the_wreath_group(brute_max):
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        k = 3
        own = torch.randn(k, k, generator=g, dtype=torch.float64)
        kids = {"a": torch.randn(3 * k, 3 * k, generator=g, dtype=torch.float64),
                "b": torch.randn(2 * k, 2 * k, generator=g, dtype=torch.float64)}
        sol = solve_family(own, kids, k, brute_max=brute_max)
        value = float(own[torch.arange(k), sol.outer].sum()) + sum(
            float(c[torch.arange(c.shape[0]), sol.children[n]].sum()) for n, c in kids.items())
        best = _brute_family(own, kids, k)
        assert value == pytest.approx(best, abs=1e-9) and sol.value == pytest.approx(best, abs=1e-9)
        for n, c in kids.items():   # every child follows the outer perm
            m = c.shape[0] // k
            assert torch.equal(sol.children[n].view(k, m) // m, sol.outer.view(k, 1).expand(k, m))


def test_lazy_bounds_skip_the_inner_problems_of_mismatched_blocks():
    """A planted expert-like cost: the exact optimum with far fewer than |Q|² inner LAPs."""
    g = torch.Generator().manual_seed(1)
    k, m = 8, 40
    x = torch.randn(k * m, 64, generator=g, dtype=torch.float64)
    perm = prb.random_permutation(PermutationSpec({"w": (Blocked((k, m), ("Q", "P")),)}, nested={"P": "Q"}),
                                  {"w": torch.zeros(k * m)}, 3)["P"]
    cost = x @ x[perm].T + 0.1 * torch.randn(k * m, k * m, generator=g, dtype=torch.float64)
    lazy = solve_family(None, {"P": cost}, k)
    full = solve_family(None, {"P": cost}, k, brute_max=0)
    assert torch.equal(lazy.children["P"], torch.argsort(perm)) and lazy.inner_solves < k * k / 2
    assert lazy.value == pytest.approx(full.value, abs=1e-9) and full.inner_possible == k * k


def test_within_blocks_and_source_order():
    g = torch.Generator().manual_seed(2)
    k, m = 3, 4
    cost = torch.randn(k * m, k * m, generator=g, dtype=torch.float64)
    outer = torch.tensor([2, 0, 1])
    p = solve_within_blocks(cost, outer, brute_max=0)
    for a in range(k):
        blk = cost[a * m:(a + 1) * m, outer[a] * m:(outer[a] + 1) * m]
        best = max(float(sum(blk[i, s[i]] for i in range(m))) for s in itertools.permutations(range(m)))
        assert float(cost[torch.arange(a * m, (a + 1) * m), p[a * m:(a + 1) * m]].sum()) == pytest.approx(best)
    s = source_ordered(p, outer)   # block k of S = the block of P that reads source block k
    for a in range(k):
        assert torch.equal(s[outer[a] * m:(outer[a] + 1) * m], p[a * m:(a + 1) * m])


# --- a tiny GQA block: inp -> (q, k, v: K KV heads, G query heads each) -> o (+ residual) -> out ---
def gqa_spec(K, G, d, rope, nested=True):
    qk = None if rope else "P_qk"
    heads = "P_q" if nested else "P_g"
    axes = {"inp.weight": ("P_res", None),
            "q.weight": (Blocked((K, G, d), ("P_kv", heads, qk)), "P_res"),
            "k.weight": (Blocked((K, d), ("P_kv", qk)), "P_res"),
            "v.weight": (Blocked((K, d), ("P_kv", "P_v")), "P_res"),
            "o.weight": ("P_res", Blocked((K, G, d), ("P_kv", heads, "P_v"))),
            "out.weight": (None, "P_res")}
    if not nested:   # the shared form: one query-head perm (G) and one value-dim perm (d) for every group
        axes["v.weight"] = (Blocked((K, d), ("P_kv", "P_vd")), "P_res")
        axes["o.weight"] = ("P_res", Blocked((K, G, d), ("P_kv", "P_g", "P_vd")))
        return PermutationSpec(axes)
    return PermutationSpec(axes, nested={"P_q": "P_kv", "P_v": "P_kv"} | ({} if rope else {"P_qk": "P_kv"}))


class TinyGQA(nn.Module):
    def __init__(self, K=2, G=4, d=4, D=16, rope=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.K, self.G, self.d, self.rope = K, G, d, rope
        self.inp = nn.Linear(7, D, bias=False)
        self.q, self.k = nn.Linear(D, K * G * d, bias=False), nn.Linear(D, K * d, bias=False)
        self.v, self.o = nn.Linear(D, K * d, bias=False), nn.Linear(K * G * d, D, bias=False)
        self.out = nn.Linear(D, 3, bias=False)

    def _rotary(self, x):   # rotate dim pairs (i, i + d/2) by position: head dims are tied, only heads move
        T, h = x.shape[1], self.d // 2
        ang = torch.arange(T).view(T, 1) * (10.0 ** (-torch.arange(h) / h)).view(1, h)
        cos, sin = ang.cos().view(1, T, 1, h), ang.sin().view(1, T, 1, h)
        a, b = x[..., :h], x[..., h:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    def forward(self, x):
        B, T, _ = x.shape
        K, G, d = self.K, self.G, self.d
        h = self.inp(x)
        q = self.q(h).view(B, T, K * G, d)
        k = self.k(h).view(B, T, K, d)
        if self.rope:
            q, k = self._rotary(q), self._rotary(k)
        q, k, v = q.view(B, T, K, G, d), k, self.v(h).view(B, T, K, d)
        att = torch.einsum("btkgd,bskd->bkgts", q, k).div(math.sqrt(d)).softmax(-1)
        a = torch.einsum("bkgts,bskv->btkgv", att, v).reshape(B, T, K * G * d)
        return self.out(torch.relu(h + self.o(a)))


def _planted(model, spec, seed):
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    planted = prb.random_permutation(spec, a, seed)
    return a, prb.apply_permutation(spec, planted, a), planted


@pytest.mark.parametrize("rope", [False, True])
def test_planted_gqa_is_recovered_by_weight_matching(rope):
    for seed in range(4):
        model = TinyGQA(K=2, G=4, d=8, D=32, rope=rope, seed=seed)
        spec = gqa_spec(2, 4, 8, rope)
        a, b, planted = _planted(model, spec, 100 + seed)
        x = torch.randn(2, 5, 7)
        model_b = TinyGQA(K=2, G=4, d=8, D=32, rope=rope)
        model_b.load_state_dict(b)
        torch.testing.assert_close(model_b(x), model(x), atol=1e-5, rtol=1e-5)   # the planted perm is a symmetry
        res = prb.weight_matching(spec, a, b)
        aligned = prb.apply_permutation(spec, res.perms, b)
        assert all(torch.equal(aligned[k], a[k]) for k in a)
        assert all(torch.equal(res.perms[p], v) for p, v in prb.invert_permutation(planted).items())


def test_planted_gqa_is_recovered_by_activation_matching():
    for rope in (False, True):
        model = TinyGQA(K=2, G=4, d=4, D=16, rope=rope, seed=3)
        spec = gqa_spec(2, 4, 4, rope)
        a, b, planted = _planted(model, spec, 7)
        model_b = TinyGQA(K=2, G=4, d=4, D=16, rope=rope)
        model_b.load_state_dict(b)
        data = torch.randn(64, 6, 7, generator=torch.Generator().manual_seed(0))
        res = prb.activation_matching(model, model_b, spec, data, batch_size=16)
        aligned = prb.apply_permutation(spec, res.perms, b)
        assert all(torch.equal(aligned[k], a[k]) for k in a), rope
        assert res.objective[-1] >= res.objective[0]


# --- a tiny stacked MoE: router [E, D], w1 [E, I, D], w2 [E, D, I], with the residual perm around ---
def moe_spec(E, I, nested=True):
    hid = "P_hid" if nested else "P_h"
    return PermutationSpec({"inp.weight": ("P_res", None), "router": ("P_exp", "P_res"),
                            "w1": ("P_exp", hid, "P_res"), "b1": (Blocked((E, I), ("P_exp", hid)),),
                            "w2": ("P_exp", "P_res", hid), "out.weight": (None, "P_res")},
                           nested={"P_hid": "P_exp"} if nested else {})


def moe_state(E=4, I=12, D=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"inp.weight": r(D, 6), "router": r(E, D), "w1": r(E, I, D), "b1": r(E * I), "w2": r(E, D, I),
            "out.weight": r(3, D)}


def test_planted_stacked_moe_is_recovered_by_weight_matching():
    for seed in range(4):
        spec, a = moe_spec(4, 12), moe_state(seed=seed)
        planted = prb.random_permutation(spec, a, 50 + seed)
        b = prb.apply_permutation(spec, planted, a)
        res = prb.weight_matching(spec, a, b)
        aligned = prb.apply_permutation(spec, res.perms, b)
        assert all(torch.equal(aligned[k], a[k]) for k in a)


class DenseMoE(nn.Module):
    """Stacked experts as Linears: up [E·I, D] Blocked (E, I) rows, down [D, E·I], gates from a router."""

    def __init__(self, E=4, I=6, D=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.E, self.I = E, I
        self.inp, self.router = nn.Linear(5, D), nn.Linear(D, E, bias=False)
        self.up, self.down, self.out = nn.Linear(D, E * I), nn.Linear(E * I, D, bias=False), nn.Linear(D, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        gate = self.router(h).softmax(-1)
        u = torch.relu(self.up(h)).view(*h.shape[:-1], self.E, self.I) * gate.unsqueeze(-1)
        return self.out(h + self.down(u.flatten(-2)))


def dense_moe_spec(E, I):
    return PermutationSpec({"inp.weight": ("P_res", None), "inp.bias": ("P_res",), "router.weight": ("P_exp", "P_res"),
                            "up.weight": (Blocked((E, I), ("P_exp", "P_hid")), "P_res"),
                            "up.bias": (Blocked((E, I), ("P_exp", "P_hid")),),
                            "down.weight": ("P_res", Blocked((E, I), ("P_exp", "P_hid"))),
                            "out.weight": (None, "P_res"), "out.bias": (None,)}, nested={"P_hid": "P_exp"})


def test_planted_moe_is_recovered_by_activation_matching():
    model, spec = DenseMoE(seed=1), dense_moe_spec(4, 6)
    a, b, planted = _planted(model, spec, 11)
    model_b = DenseMoE()
    model_b.load_state_dict(b)
    x = torch.randn(256, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model_b(x), model(x), atol=1e-5, rtol=1e-5)
    res = prb.activation_matching(model, model_b, spec, x, batch_size=64)
    aligned = prb.apply_permutation(spec, res.perms, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)


def test_the_objective_never_decreases_and_falls_back_when_children_interact():
    """Family visits from random starting perms on unrelated models: each kept step raises the true
    objective; o_proj's two children make some joint solves overshoot, and the fallback takes over."""
    fallbacks = 0
    for seed in range(6):
        model_a, model_b = TinyGQA(K=2, G=4, d=4, D=16, seed=seed), TinyGQA(K=2, G=4, d=4, D=16, seed=seed + 50)
        spec = gqa_spec(2, 4, 4, rope=False)
        a, b = model_a.state_dict(), model_b.state_dict()
        costs = NestedCosts(spec, a, b)
        prob = _Problem(costs, spec, None, 1e-12)
        perms = prb.random_permutation(spec, a, seed)
        value = costs.objective(perms)
        for _ in range(3):
            for q, kids in prob.fams:
                _step(costs, perms, q, kids, prob.keys_of[q], 1e-12, None, prob.stats)
                new = costs.objective(perms)
                assert new >= value - 1e-9 * abs(value)
                value = new
        fallbacks += prob.stats["fallbacks"]
        _, history, *_ = nested_descent(spec, a, b, seed=seed)
        assert all(y >= x - 1e-9 * abs(x) for x, y in zip(history, history[1:]))
    assert fallbacks > 0


def _noisy_pair(seed, noise):
    model = TinyGQA(K=2, G=4, d=8, D=32, seed=seed)
    spec = gqa_spec(2, 4, 8, rope=True)
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1000)
    noisy = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) for k, v in a.items()}
    planted = prb.random_permutation(spec, a, seed + 7)
    return spec, a, prb.apply_permutation(spec, planted, noisy), planted


def test_nested_spec_recovers_per_group_perms_that_the_shared_spec_cannot():
    """B = permuted(A + 30% noise), the planted perm drawn per KV group: the nested spec recovers it
    and reaches a higher objective than the shared-head spec, which can only apply one query-head and
    one value-dim perm to every group (figures: docs/matching.md)."""
    for seed in range(3):
        spec, a, b, planted = _noisy_pair(seed, 0.3)
        nested = prb.weight_matching(spec, a, b)
        truth = prb.invert_permutation(planted)
        assert all(torch.equal(nested.perms[p], v) for p, v in truth.items())
        shared = prb.weight_matching(gqa_spec(2, 4, 8, rope=True, nested=False), a, b)
        assert nested.objective[-1] > shared.objective[-1] * 1.05


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="child 'P' has a cost of shape \\[5, 5\\]"):
        solve_family(None, {"P": torch.zeros(5, 5)}, 2)
    with pytest.raises(ValueError, match="outer cost has shape \\[3, 3\\]; expected \\[2, 2\\]"):
        solve_family(torch.zeros(3, 3), {}, 2)
    spec, a = moe_spec(4, 12), moe_state()
    b = {k: v.clone() for k, v in a.items()}
    b["w1"] = b["w1"][:, :6]
    with pytest.raises(ValueError, match="w1"):
        prb.weight_matching(spec, a, b)
    from pyrebasin.matching.costs import WeightCosts
    with pytest.raises(ValueError, match="nested perms .*NestedCosts"):
        WeightCosts(spec, a, a)   # the plain provider refuses nested specs instead of mis-gathering them
    bad = prb.identity_permutation(spec, a)
    bad["P_hid"] = torch.randperm(48, generator=torch.Generator().manual_seed(0))   # breaks the expert blocks
    with pytest.raises(ValueError, match="P_hid"):
        prb.weight_matching(spec, a, a, init=bad)


def test_init_and_restarts_on_a_nested_spec():
    spec, a = moe_spec(4, 12), moe_state(seed=5)
    planted = prb.random_permutation(spec, a, 1)
    b = prb.apply_permutation(spec, planted, a)
    truth = prb.invert_permutation(planted)
    res = prb.weight_matching(spec, a, b, init=truth, method="textbook")
    assert all(torch.equal(res.perms[p], truth[p]) for p in truth) and res.objective[0] == res.objective[-1]
    res = prb.weight_matching(spec, a, b, method="thorough")
    assert all(torch.equal(res.perms[p], truth[p]) for p in truth) and res.seed in range(4)


def test_nested_activation_matching_in_passes_is_identical():
    """`max_memory` splits the sites into passes; a nested site's width is its factors' product (K·G·d,
    not |P_kv|·|P_q|·|P_v|), so the plan fits what is really held."""
    from pyrebasin.matching.activation_stats import find_sites, plan_passes, site_width
    from pyrebasin.moments import CrossMoments
    model = TinyGQA(K=2, G=4, d=4, D=16, seed=3)
    spec = gqa_spec(2, 4, 4, rope=False)
    a, b, planted = _planted(model, spec, 7)
    model_b = TinyGQA(K=2, G=4, d=4, D=16)
    model_b.load_state_dict(b)
    sizes = spec.perm_sizes(a)
    widths = {s.module: site_width(s, sizes) for s in find_sites(model, spec)}
    assert widths["o"] == widths["q"] == 2 * 4 * 4 and widths["out"] == 16
    data = torch.randn(64, 6, 7, generator=torch.Generator().manual_seed(0))
    whole = prb.activation_matching(model, model_b, spec, data, batch_size=16)
    budget = 3 * CrossMoments.nbytes(32, 32)
    assert len(plan_passes(find_sites(model, spec), sizes, set(), budget, torch.float64)) >= 2
    split = prb.activation_matching(model, model_b, spec, data, batch_size=16, max_memory=budget)
    assert all(torch.equal(split.perms[p], whole.perms[p]) for p in whole.perms)
    assert all(torch.equal(v, prb.invert_permutation(planted)[p]) for p, v in split.perms.items())
