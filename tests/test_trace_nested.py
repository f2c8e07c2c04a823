"""trace_spec's nested perms (tracing/nesting.py) on hand-written GQA attention and stacked experts,
and the cases where nesting must not be stated (an op mixing along the outer axis alone, a tensor
holding the inner axis without the outer), each checked by check_spec."""
import math

import pytest
import torch
from torch import nn

import pyrebasin as prb


class GQA(nn.Module):
    """Grouped-query attention without RoPE (HF's repeat_kv: expand + reshape), optionally with a
    softmax across the KV heads (`kv_softmax`: mixes KV heads while keeping query heads apart) or a
    per-dim query scale shared by all heads (`dim_scale`)."""

    def __init__(self, d=12, heads=4, kv=2, hd=3, kv_softmax=False, dim_scale=False):
        super().__init__()
        self.h, self.kv, self.hd, self.kv_softmax = heads, kv, hd, kv_softmax
        self.inp = nn.Linear(2, d)
        self.q = nn.Linear(d, heads * hd)
        self.k = nn.Linear(d, kv * hd)
        self.v = nn.Linear(d, kv * hd)
        self.o = nn.Linear(heads * hd, d)
        self.scale = nn.Parameter(torch.randn(hd)) if dim_scale else None
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        x = self.inp(x)
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)
        if self.scale is not None:
            q = q * self.scale
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        g = self.h // self.kv
        k = k[:, :, None].expand(b, self.kv, g, t, self.hd).reshape(b, self.h, t, self.hd)
        v = v[:, :, None].expand(b, self.kv, g, t, self.hd).reshape(b, self.h, t, self.hd)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        if self.kv_softmax:   # across KV heads, per query head within the group
            s = s.view(b, self.kv, g, t, t).softmax(1).view(b, self.h, t, t)
        a = s.softmax(-1) @ v
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


class Experts(nn.Module):
    """Stacked experts picked by a top-k router (`w[ids]`, as HF's batched_mm)."""

    def __init__(self, d=6, hidden=5, experts=4, topk=2):
        super().__init__()
        self.inp, self.out, self.topk = nn.Linear(2, d), nn.Linear(d, 3), topk
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, hidden, d) / d ** 0.5)
        self.b1 = nn.Parameter(torch.randn(experts, hidden))
        self.w2 = nn.Parameter(torch.randn(experts, d, hidden) / hidden ** 0.5)

    def forward(self, x):
        x = self.inp(x).reshape(-1, self.inp.out_features)
        w, ids = self.router(x).softmax(-1).topk(self.topk, -1)
        h = torch.relu((self.w1[ids] @ x[:, None, :, None]).squeeze(-1) + self.b1[ids])
        y = (self.w2[ids] @ h[..., None]).squeeze(-1)
        return self.out(x + (w[..., None] * y).sum(1))


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_gqa_query_heads_qk_and_vo_nest_under_kv_heads():
    torch.manual_seed(0)
    model, x = GQA(), _x(2, 5, 2)
    spec = prb.trace_spec(model, x)
    assert spec.nested == {"P_group_heads": "P_heads", "P_qk": "P_heads", "P_vo": "P_heads"}
    sizes = spec.perm_sizes(model.state_dict())
    assert sorted(sizes[p] for p in spec.nested) == [4, 6, 6]    # 2 kv x 2 heads, 2 kv x 3 dims (qk, vo)
    prb.check_spec(model, spec, x)
    flat = prb.trace_spec(model, x, nested=False)
    assert flat.nested == {} and flat.axes_to_perm == spec.axes_to_perm
    assert sorted(flat.perm_sizes(model.state_dict())[p] for p in spec.nested) == [2, 3, 3]
    back = prb.PermutationSpec.from_json(spec.to_json())
    assert back == spec


def test_softmax_across_kv_heads_keeps_query_heads_shared():
    torch.manual_seed(0)
    model, x = GQA(kv_softmax=True), _x(2, 5, 2)
    spec = prb.trace_spec(model, x)
    assert spec.nested == {"P_qk": "P_heads", "P_vo": "P_heads"}   # query heads: one perm for all groups
    prb.check_spec(model, spec, x)
    # stating it anyway gives a wrong spec, which check_spec catches
    wrong = prb.PermutationSpec(spec.axes_to_perm, spec.fixed_reasons, {**spec.nested, "P_group_heads": "P_heads"})
    with pytest.raises(prb.SpecCheckError):
        prb.check_spec(model, wrong, x, modes=("eval",))


def test_a_dim_scale_shared_by_heads_keeps_qk_shared():
    torch.manual_seed(0)
    model, x = GQA(dim_scale=True), _x(2, 5, 2)
    spec = prb.trace_spec(model, x)
    assert spec.nested == {"P_group_heads": "P_heads", "P_vo": "P_heads"}
    assert spec.axes_to_perm["scale"][0] is not None            # still permuted, by the shared perm
    prb.check_spec(model, spec, x)


def test_stacked_experts_hidden_units_nest_under_the_experts():
    torch.manual_seed(0)
    model, x = Experts(), _x(3, 4, 2)
    spec = prb.trace_spec(model, x)
    ax = spec.axes_to_perm
    experts, hidden = ax["w1"][0], ax["w1"][1]
    assert ax["router.weight"][0] == ax["w2"][0] == experts and ax["w2"][2] == hidden
    assert spec.nested == {hidden: experts}
    assert spec.perm_sizes(model.state_dict())[hidden] == 4 * 5
    prb.check_spec(model, spec, x)
    perms = prb.random_permutation(spec, model.state_dict(), 1)
    inner = perms[hidden].view(4, 5) % 5
    assert not all(torch.equal(inner[0], r) for r in inner[1:])  # experts got different hidden orders
    assert prb.trace_spec(model, x, nested=False).nested == {}


def test_symmetry_bits_describe_and_difference_see_nesting():
    torch.manual_seed(0)
    model, x = GQA(), _x(2, 5, 2)
    spec, flat = prb.trace_spec(model, x), prb.trace_spec(model, x, nested=False)
    state = model.state_dict()
    lg = [math.log2(math.factorial(n)) for n in range(13)]
    shared = lg[12] + lg[2] + lg[2] + lg[3] + lg[3]           # residual, heads, group heads, qk, vo
    assert prb.trace.symmetry_bits(flat, state) == pytest.approx(shared)
    assert prb.trace.symmetry_bits(spec, state) == pytest.approx(lg[12] + lg[2] + 2 * (lg[2] + lg[3] + lg[3]))
    assert "P_vo (6 units) nested under P_heads:" in prb.describe_spec(spec, state)
    diff = prb.spec_difference(spec, flat)
    assert sorted(diff) == sorted(f"in the first spec, {p} is nested under P_heads; not in the other"
                                  for p in ("P_group_heads", "P_qk", "P_vo"))
