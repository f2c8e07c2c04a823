"""trace_spec / check_spec: traced specs equal the zoo's hand-written ones (up to naming), every
traced spec passes the random-permutation invariance check (eval + train), and what cannot be
modelled is reported (error naming op/node/module, or a fixed entry with its reason)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import pyrebasin as prb
from pyrebasin.tracing.frontends import fx_graph
from pyrebasin.zoo import MLP, VGG, ResNet20, Transformer

ZOO = {
    "mlp": (lambda: MLP(in_features=12, width=[16, 24, 20], classes=5), (4, 12)),
    "mlp_ln": (lambda: MLP(in_features=12, width=24, depth=2, classes=5, norm="ln"), (4, 12)),
    "mlp_bn": (lambda: MLP(in_features=12, width=24, depth=2, classes=5, norm="bn"), (4, 12)),
    "vgg1d_bn": (lambda: VGG(conv_dim=1, input_size=16, cfg=(8, "M", 12, "M"), hidden=16), (3, 16)),
    "vgg1d_none": (lambda: VGG(conv_dim=1, input_size=16, cfg=(8, 12, "M"), hidden=16, norm=None),
                   (3, 16)),
    "vgg2d_ln": (lambda: VGG(conv_dim=2, input_size=8, cfg=(8, "M", 12), hidden=16, norm="ln"),
                 (3, 8, 8)),
    "vgg2d_bn": (lambda: VGG(conv_dim=2, input_size=8, cfg=(8, "M", 12), hidden=16), (3, 8, 8)),
    "vgg1d_ln": (lambda: VGG(conv_dim=1, input_size=16, cfg=(8, "M", 12), hidden=16, norm="ln"),
                 (3, 16)),
    "vgg2d_none": (lambda: VGG(conv_dim=2, input_size=8, cfg=(8, "M", 12), hidden=16, norm=None),
                   (3, 8, 8)),
    "resnet20_bn": (lambda: ResNet20(norm="bn", blocks_per_stage=2), (3, 16)),
    "resnet20_ln2d": (lambda: ResNet20(norm="ln", blocks_per_stage=1, conv_dim=2), (3, 8, 8)),
    "resnet20_none": (lambda: ResNet20(norm=None, blocks_per_stage=1), (3, 16)),
    "resnet20_bn2d": (lambda: ResNet20(norm="bn", blocks_per_stage=1, conv_dim=2), (3, 8, 8)),
    "resnet20_ln1d": (lambda: ResNet20(norm="ln", blocks_per_stage=1), (3, 16)),
    "transformer": (lambda: Transformer(seq_len=8, patch=2, d_model=16, heads=4, layers=2), (3, 8)),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    make, shape = ZOO[name]
    return make(), torch.randn(shape)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def assert_untouched(model, snap):
    state, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} was modified"
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_traced_equals_hand_written(name):
    model, x = build(name)
    model.train()
    snap = snapshot(model)
    spec = prb.trace_spec(model, x)
    hand = model.permutation_spec()    # hand-written zoo specs share within-head perms across heads
    assert prb.spec_difference(prb.trace_spec(model, x, nested=False), hand) == []
    assert all(" is nested under " in d for d in prb.spec_difference(spec, hand))
    assert prb.spec_equivalent(prb.PermutationSpec(spec.axes_to_perm), hand)   # same slots, nesting aside
    for mode_spec in (spec, hand):
        report = prb.check_spec(model, mode_spec, x)
        assert report.ok and set(report.max_abs_diff) == {"eval", "train"}
    assert_untouched(model, snap)


def test_zoo_fx_and_export_agree():
    model, x = build("mlp_bn")
    fx = prb.trace_spec(model, x, frontend="fx")
    ex = prb.trace_spec(model, x, frontend="export")
    assert fx.axes_to_perm == ex.axes_to_perm
    assert fx.perm_names == ["P_layers.0.out", "P_layers.1.out"]
    assert fx.fixed_reasons["norms.0.num_batches_tracked"].startswith("scalar")
    assert "output" in fx.fixed_reasons["head.bias"]


def test_zoo_names_are_readable():
    model, x = build("transformer")
    names = set(prb.trace_spec(model, x).perm_names)
    assert {"P_residual_0", "P_blocks.0.attn.heads", "P_blocks.0.attn.qk", "P_blocks.0.attn.vo",
            "P_blocks.1.fc1.out"} <= names
    model, x = build("resnet20_bn")
    names = prb.trace_spec(model, x).perm_names
    assert names[:2] == ["P_residual_0", "P_stages.0.0.conv1.out"] and "P_residual_2" in names


def test_spec_equivalence_is_up_to_naming_only():
    spec = MLP(in_features=4, width=8, depth=2).permutation_spec()
    renamed = prb.PermutationSpec({k: tuple(e and e + "_x" for e in v)
                                   for k, v in spec.axes_to_perm.items()})
    assert prb.spec_equivalent(spec, renamed)
    merged = prb.PermutationSpec({k: tuple(e and "P" for e in v) for k, v in spec.axes_to_perm.items()})
    assert not prb.spec_equivalent(spec, merged)


# --- nets written here ---------------------------------------------------------------------------
class ConvFlat(nn.Module):
    """conv -> BN -> flatten -> linear: the linear's input axis is (channel, position) blocked."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return self.out(F.relu(self.fc(torch.flatten(x, 1))))


def test_conv_flatten_linear_blocked():
    model, x = ConvFlat(), torch.randn(4, 1, 8, 8)
    spec = prb.trace_spec(model, x)
    assert spec.axes_to_perm["fc.weight"] == ("P_fc.out", prb.Blocked((6, 16), ("P_conv.out", None)))
    assert spec.axes_to_perm["bn.running_var"] == ("P_conv.out",)
    text = prb.describe_spec(spec, model.state_dict())
    assert "P_conv.out (6 units): conv.weight[0]" in text and "fc.weight[1:0/2]" in text
    assert "fixed bn.num_batches_tracked: scalar" in text
    assert fx_graph(model, (x,), {}, set(model.state_dict())).frontend == "fx"
    prb.check_spec(model, spec, x)


class Block18(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18ish(nn.Module):
    """ResNet18 layout (4 stages x 2 blocks, downsampling shortcuts) for 8x8 digits."""

    def __init__(self, w=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        chans, layers, c = [w, 2 * w, 4 * w, 8 * w], [], w
        for i, co in enumerate(chans):
            layers.append(nn.Sequential(Block18(c, co, 1 if i == 0 else 2), Block18(co, co, 1)))
            c = co
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x.unsqueeze(1)))), 1))


def test_resnet18_style_with_downsampling_shortcuts():
    torch.manual_seed(0)
    model, x = ResNet18ish(), torch.randn(5, 8, 8)
    model.train()
    snap = snapshot(model)
    spec = prb.trace_spec(model, x)
    # stem + 4 stage streams, one inner group per block
    assert sum(n.startswith("P_residual") for n in spec.perm_names) == 4
    assert len(spec.perm_names) == 4 + 8
    sc = spec.axes_to_perm["layers.1.0.down.0.weight"]
    assert sc[0] == spec.axes_to_perm["layers.1.1.bn2.running_mean"][0] != sc[1]
    prb.check_spec(model, spec, x)
    assert_untouched(model, snap)


class Grouped(nn.Module):
    """Grouped + depthwise convolutions and a GroupNorm with 2 < groups < channels."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv1d(8, 12, 3, padding=1, groups=4)
        self.dw = nn.Conv1d(12, 24, 3, padding=1, groups=12)
        self.fc = nn.Linear(24, 2)

    def forward(self, x):
        x = F.gelu(self.gn(self.c1(x.unsqueeze(1))))
        return self.fc(self.dw(F.relu(self.c2(x))).mean(-1))


def test_grouped_depthwise_conv_and_groupnorm():
    torch.manual_seed(0)
    model, x = Grouped(), torch.randn(3, 10)
    spec = prb.trace_spec(model, x)
    gn = spec.axes_to_perm["gn.weight"][0]
    assert isinstance(gn, prb.Blocked) and gn.shape == (4, 2) and None not in gn.perms
    c2 = spec.axes_to_perm["c2.weight"]  # [12, 2, 3]: out = (groups 4, 3 per group), in = per group
    assert c2[0].shape == (4, 3) and c2[0].perms[0] == gn.perms[0] and c2[1] == gn.perms[1]
    dw = spec.axes_to_perm["dw.weight"]  # depthwise x2: out = (12 groups = c2's (4, 3), 2), in = 1
    assert dw[0].shape == (4, 3, 2) and dw[0].perms[:2] == c2[0].perms and dw[1] is None
    prb.check_spec(model, spec, x)


class CatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
        self.qkv = nn.Linear(16, 3 * 8)
        self.h1 = nn.Linear(8, 2)
        self.c, self.d = nn.Linear(6, 5), nn.Linear(6, 3)
        self.h2 = nn.Linear(5 + 3, 2)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], -1)  # equal pieces: (2, 8) blocked
        q, k, v = self.qkv(h).chunk(3, dim=-1)  # equal chunks: (3, 8) blocked, q/k/v share the 8
        y = torch.cat([self.c(x), self.d(x)], -1)  # unequal pieces: frozen
        return self.h1(torch.tanh(q * k + v)) + self.h2(y)


def test_weight_norm_parametrization():  # fx leaves it opaque, export traces the parametrization
    model, x = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4)
    spec = prb.trace_spec(model, x)
    assert spec.axes_to_perm["0.parametrizations.weight.original0"] == ("P_0.out", None)  # g
    assert spec.axes_to_perm["0.parametrizations.weight.original1"] == ("P_0.out", None)  # v
    prb.check_spec(model, spec, x)


def test_cat_and_split():
    model, x = CatSplit(), torch.randn(4, 6)
    spec = prb.trace_spec(model, x)
    assert spec.axes_to_perm["a.weight"][0] == spec.axes_to_perm["b.weight"][0] is not None
    qkv = spec.axes_to_perm["qkv.weight"]
    assert qkv[1] == prb.Blocked((2, 8), (None, spec.axes_to_perm["a.weight"][0]))  # cat index frozen
    assert qkv[0].shape == (3, 8) and qkv[0].perms[0] is None
    assert spec.axes_to_perm["h1.weight"] == (None, qkv[0].perms[1])
    assert spec.axes_to_perm["c.weight"] == spec.axes_to_perm["d.weight"] == (None, None)
    assert "unequal" in spec.fixed_reasons["c.weight"]
    prb.check_spec(model, spec, x)


class TiedLM(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.out(self.ln(h + F.relu(self.fc(h))))


def test_tied_weights_share_one_entry():
    model, ids = TiedLM(), torch.randint(0, 11, (2, 5))
    for frontend in ("fx", "export"):
        spec = prb.trace_spec(model, ids, frontend=frontend)
        assert spec.axes_to_perm["emb.weight"] == spec.axes_to_perm["out.weight"] == (None, "P_emb.out")
        assert spec.axes_to_perm["ln.weight"] == ("P_emb.out",)
        prb.check_spec(model, spec, ids)


class Functional(nn.Module):
    """Parameters used only through functional calls (get_attr nodes), one of them unused."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(7, 5))
        self.b1 = nn.Parameter(torch.randn(7))
        self.w2 = nn.Parameter(torch.randn(3, 7))
        self.scale = nn.Parameter(torch.ones(7))
        self.spare = nn.Parameter(torch.randn(4))
        self.register_buffer("offset", torch.zeros(7))

    def forward(self, x):
        h = F.relu(F.linear(x, self.w1, self.b1) * self.scale + self.offset)
        return F.linear(h, self.w2)


def test_functional_parameters_and_unused_ones():
    model, x = Functional(), torch.randn(4, 5)
    spec = prb.trace_spec(model, x, frontend="fx")
    p = spec.axes_to_perm["w1.weight" if "w1.weight" in spec.axes_to_perm else "w1"][0]
    assert p is not None
    assert spec.axes_to_perm["b1"] == spec.axes_to_perm["scale"] == spec.axes_to_perm["offset"] == (p,)
    assert spec.axes_to_perm["w2"] == (None, p)
    assert spec.axes_to_perm["spare"] == (None,)
    assert "not used" in spec.fixed_reasons["spare"]
    assert prb.spec_equivalent(spec, prb.trace_spec(model, x, frontend="export"))
    prb.check_spec(model, spec, x)


class FunctionalBN(nn.Module):
    """F.batch_norm on its own buffers, F.glu halves, and a dict output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.w, self.b = nn.Parameter(torch.ones(6)), nn.Parameter(torch.zeros(6))
        self.register_buffer("rm", torch.zeros(6))
        self.register_buffer("rv", torch.ones(6))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = F.batch_norm(self.fc(x), self.rm, self.rv, self.w, self.b, training=self.training)
        return {"y": self.out(F.glu(h, dim=-1)), "aux": h.sum(-1)}


def test_functional_batch_norm_glu_dict_output():
    model, x = FunctionalBN(), torch.randn(5, 4)
    model.train()
    snap = snapshot(model)
    for frontend in ("fx", "export"):
        spec = prb.trace_spec(model, x, frontend=frontend)
        half = prb.Blocked((2, 3), (None, "P_fc.out.1"))  # glu: a * sigmoid(b), same perm on both
        assert all(spec.axes_to_perm[k] == (half,) for k in ("w", "b", "rm", "rv", "fc.bias"))
        assert spec.axes_to_perm["out.weight"] == (None, "P_fc.out.1")
        prb.check_spec(model, spec, x)
    assert_untouched(model, snap)


def test_fx_front_end_on_hand_written_attention():
    model, x = build("transformer")  # `b, t, _ = x.shape` is a getattr node in fx
    spec = prb.trace_spec(model, x, frontend="fx")
    assert prb.spec_equivalent(prb.trace_spec(model, x, frontend="fx", nested=False), model.permutation_spec())
    assert spec.nested == prb.trace_spec(model, x, frontend="export").nested != {}


class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        with torch.no_grad():  # export wraps this region in a higher-order op: inlined
            h = torch.relu(self.a(x))
        return self.b(h)


def test_no_grad_regions_are_inlined():
    model, x = NoGrad(), torch.randn(3, 4)
    spec = prb.trace_spec(model, x, frontend="export")
    assert spec.axes_to_perm["b.weight"] == (None, "P_a.out")
    assert prb.PermutationSpec.from_json(spec.to_json()) == spec
    prb.check_spec(model, spec, x)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.fft.fft(self.fc(x)).real)


def test_unknown_op_is_an_error_or_an_explicit_freeze():
    model, x = Unknown(), torch.randn(3, 4)
    with pytest.raises(prb.UnsupportedOpError, match=r"fft.*node.*module"):
        prb.trace_spec(model, x)
    spec = prb.trace_spec(model, x, unknown="freeze")
    assert spec.axes_to_perm["fc.weight"] == (None, None)
    assert "fft" in spec.fixed_reasons["fc.weight"]
    prb.check_spec(model, spec, x)


def test_check_spec_catches_a_wrong_spec_and_leaves_the_model_alone():
    model, x = build("vgg1d_bn")
    model.eval()
    snap = snapshot(model)
    spec = model.permutation_spec()
    wrong = prb.PermutationSpec(dict(spec.axes_to_perm))
    wrong.axes_to_perm["features.1.running_var"] = (None,)  # BN stats must follow the channel
    report = prb.check_spec(model, wrong, x, raise_on_failure=False)
    assert not report.ok and report.failures
    with pytest.raises(prb.SpecCheckError, match="differs"):
        prb.check_spec(model, wrong, x, modes=("eval",))
    assert_untouched(model, snap)


def test_bad_arguments():
    model, x = build("mlp")
    with pytest.raises(ValueError, match="frontend"):
        prb.trace_spec(model, x, frontend="jit")
    with pytest.raises(TypeError, match="example_inputs"):
        prb.trace_spec(model, 3.0)
    with pytest.raises(ValueError, match="modes"):
        prb.check_spec(model, model.permutation_spec(), x, modes=("test",))


@pytest.mark.parametrize("name", ["mlp_bn", "vgg2d_ln", "resnet20_bn", "transformer"])
def test_weight_matching_recovers_planted_permutation_with_traced_spec(name):
    model, x = build(name)
    g = torch.Generator().manual_seed(1)
    state_a = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in model.state_dict().items()}
    spec = prb.trace_spec(model, x, nested=False)   # nested families: tests/test_matching_nested*.py
    pi = prb.random_permutation(spec, state_a, generator=7)
    state_b = prb.apply_permutation(spec, pi, state_a)
    result = prb.weight_matching(spec, state_a, state_b)
    inverse = prb.invert_permutation(pi)
    assert all(torch.equal(result.perms[p], inverse[p]) for p in pi)
