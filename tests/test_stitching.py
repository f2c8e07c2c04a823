"""prb.stitching: the stitching layer kinds, closed-form inits (exact on a permuted copy), frozen and
untouched halves, errors, determinism, and the paper's claims on mnist1d-trained models."""
import pytest
import torch
from torch import nn

import pyrebasin as prb
from pyrebasin import stitching as st


def build(cls, state=None, **kw):
    torch.manual_seed(0)
    m = cls(**kw)
    if state is not None:
        m.load_state_dict(state)
    return m.eval()


@pytest.fixture(scope="module")
def mlp_pair():
    a = build(prb.zoo.MLP, width=32, depth=3)
    spec, state = a.permutation_spec(), a.state_dict()
    perms = prb.random_permutation(spec, state, 1)
    return a, build(prb.zoo.MLP, prb.apply_permutation(spec, perms, state), width=32, depth=3), perms


@pytest.fixture(scope="module")
def x40():
    return torch.randn(256, 40, generator=torch.Generator().manual_seed(0))


# --- the layer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,channel_dim,conv", [((5, 6), -1, None), ((5, 6, 11), 1, nn.Conv1d),
                                                   ((5, 6, 4, 3), 1, nn.Conv2d), ((5, 7, 6), -1, None),
                                                   ((5, 4, 6, 3), 2, None)])
def test_affine_layer_is_a_linear_or_1x1_conv_along_channel_dim(shape, channel_dim, conv):
    x = torch.randn(shape)
    layer = st.StitchLayer(6, 9, kind="affine", channel_dim=channel_dim)
    nn.init.normal_(layer.weight), nn.init.normal_(layer.bias)
    out = layer(x)
    if conv is not None:
        ref = conv(6, 9, 1)
        ref.weight.data = layer.weight.data.reshape(9, 6, *[1] * (x.dim() - 2))
        ref.bias.data = layer.bias.data
        torch.testing.assert_close(out, ref(x))
    expected = (x.movedim(channel_dim, -1) @ layer.weight.T + layer.bias).movedim(-1, channel_dim)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("kind", ["low_rank", "orthogonal", "permutation", "semi_match"])
def test_every_kind_forward_equals_its_dense_matrix(kind):
    layer = st.StitchLayer(8, 6, kind=kind, rank=3, channel_dim=1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "rotation" not in name:  # the orthogonal map's raw parameter is only ever set via .weight
                p.normal_()
        if kind == "orthogonal":
            u, _, vh = torch.linalg.svd(torch.randn(6, 8), full_matrices=False)
            layer.rotation.weight = u @ vh
        if kind in ("permutation", "semi_match"):
            layer.source.copy_(torch.tensor([7, 0, 3, 3, 1, 5]))
    x = torch.randn(4, 8, 5)
    w = layer.matrix()
    torch.testing.assert_close(layer(x), torch.einsum("oc,bcl->bol", w, x) + layer.bias[:, None])
    if kind == "low_rank":
        assert torch.linalg.matrix_rank(w) == 3
    if kind == "orthogonal":
        q = w / layer.scale
        torch.testing.assert_close(q @ q.T, torch.eye(6), atol=1e-5, rtol=0)


def test_layer_errors():
    with pytest.raises(ValueError, match="'diagonal'"):
        st.StitchLayer(4, 4, kind="diagonal")
    with pytest.raises(ValueError, match="rank=9"):
        st.StitchLayer(8, 6, kind="low_rank", rank=9)
    with pytest.raises(ValueError, match="semi_match"):
        st.StitchLayer(4, 6, kind="permutation")
    with pytest.raises(ValueError, match=r"expects 4 channels on dim -1, got activation \[2, 5\]"):
        st.StitchLayer(4, 4)(torch.randn(2, 5))


# --- exact recovery: a model and its permuted copy compute the same function ------------------------

@pytest.mark.parametrize("layer", ["norms.0", "norms.1", "norms.2"])
def test_inits_recover_a_permuted_copy_exactly(mlp_pair, x40, layer):
    a, b, perms = mlp_pair
    perm = perms[f"P_layers.{layer[-1]}"]
    ref = b(x40).argmax(-1)
    for kind, init in [("affine", "least_squares"), ("affine", "permutation"), ("orthogonal", "procrustes"),
                       ("permutation", "permutation"), ("semi_match", "least_squares"),
                       ("low_rank", "least_squares")]:
        s = st.stitch(a, b, layer, data=x40, kind=kind, init=init, rank=32)
        torch.testing.assert_close(s(x40), b(x40), atol=2e-4, rtol=1e-4, msg=f"{kind}/{init}")
        assert s.fit.r2 == pytest.approx(1.0, abs=1e-6)
        if kind in ("permutation", "semi_match"):
            assert torch.equal(s.layer.source, perm)
        m = st.evaluate_stitch(s, (x40, ref))
        assert m.agreement == 1.0 and m.relative_accuracy == 1.0
    # Without alignment, identity stitching breaks the function.
    s = st.stitch(a, b, layer, data=x40, init="identity")
    assert st.evaluate_stitch(s, (x40, ref)).agreement < 0.9


@pytest.mark.parametrize("arch,kw,layer,x", [
    (prb.zoo.VGG, {}, "features.6", torch.randn(64, 40)),
    (prb.zoo.ResNet20, {"blocks_per_stage": 1}, "stages.1.0", torch.randn(64, 40)),
    (prb.zoo.VGG, {"conv_dim": 2, "input_size": 8, "cfg": (8, "M", 16)}, "features.5", torch.randn(64, 8, 8)),
    (prb.zoo.Transformer, {"layers": 1}, "blocks.0", torch.randn(64, 40)),
])
def test_conv_and_token_layouts_recover_a_permuted_copy(arch, kw, layer, x):
    a = build(arch, **kw)
    spec, state = a.permutation_spec(), a.state_dict()
    b = build(arch, prb.apply_permutation(spec, prb.random_permutation(spec, state, 2), state), **kw)
    s = st.stitch(a, b, layer, data=x, kind="affine", init="least_squares")
    act = st.activation(a, layer, x)
    assert s.layer.channel_dim == (-1 if arch is prb.zoo.Transformer else 1)
    assert s.layer.c_in == act.shape[s.layer.channel_dim]
    torch.testing.assert_close(s(x), b(x), atol=1e-3, rtol=1e-3)


# --- the halves stay frozen and untouched -----------------------------------------------------------

def test_models_are_never_mutated_and_only_the_layer_trains(x40):
    # BatchNorm in train mode would update running stats if the halves ran on the caller's buffers.
    a, b = build(prb.zoo.MLP, width=32, depth=3, norm="bn"), build(prb.zoo.MLP, width=32, depth=3, norm="bn")
    with torch.no_grad():
        b.norms[1].running_mean.normal_()
    b.train()
    before = {k: v.clone() for k, v in list(a.state_dict().items()) + [("b." + k, v) for k, v in b.state_dict().items()]}
    y = torch.randint(0, 10, (256,))
    s = st.stitch(a, b, "norms.1", data=(x40, y), init="random", seed=3)
    assert {n for n, _ in s.named_parameters()} == {"layer.weight", "layer.bias"}
    assert set(s.state_dict()) == {"layer.weight", "layer.bias"}  # the frozen copies are not saved
    hist = st.train_stitch_(s, (x40, y), epochs=3, lr=1e-2, progress=False)
    assert hist[-1] < hist[0]
    after = dict(list(a.state_dict().items()) + [("b." + k, v) for k, v in b.state_dict().items()])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in list(a.parameters()) + list(b.parameters()))
    assert all(p.grad is None for p in list(a.parameters()) + list(b.parameters()))
    assert b.training and all(m.training for m in b.modules()) and not a.training  # flags restored
    assert not any(m._forward_hooks for m in list(a.modules()) + list(b.modules()))


def test_stitched_model_is_a_snapshot_and_moves_with_to(mlp_pair, x40):
    a, b, _ = mlp_pair
    s = st.stitch(a, b, "norms.0", data=x40)
    out = s(x40)
    s64 = s.double()
    torch.testing.assert_close(s64(x40.double()).float(), out, atol=1e-4, rtol=1e-4)
    assert a.layers[0].weight.dtype == torch.float32  # the caller's model did not move


def test_same_seed_same_result(mlp_pair, x40):
    a, b, _ = mlp_pair
    y = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(1))
    ws = []
    for _ in range(2):
        s = st.stitch(a, b, "norms.2", data=(x40, y), kind="low_rank", init="random", rank=4, seed=5)
        st.train_stitch_(s, (x40, y), epochs=2, seed=7, progress=False)
        ws.append(s.layer.matrix().detach())
    torch.testing.assert_close(ws[0], ws[1], rtol=0, atol=0)
    s = st.stitch(a, b, "norms.2", data=(x40, y), kind="low_rank", init="random", rank=4, seed=6)
    assert not torch.equal(s.layer.matrix().detach(), ws[0])


def test_soft_targets_pull_towards_the_end_model(mlp_pair, x40):
    a, b, _ = mlp_pair
    s = st.stitch(a, b, "norms.1", data=x40, init="identity")
    before = st.evaluate_stitch(s, (x40, b(x40).argmax(-1)))
    hist = st.train_stitch_(s, x40, targets="soft", epochs=20, lr=1e-2, batch_size=64, progress=False)
    after = st.evaluate_stitch(s, (x40, b(x40).argmax(-1)))
    assert hist[-1] < 0.5 * hist[0]
    assert after.soft_cross_entropy < before.soft_cross_entropy and after.agreement > before.agreement + 0.2


def test_errors(mlp_pair, x40):
    a, b, _ = mlp_pair
    with pytest.raises(ValueError, match=r"front_layer='nope'.*norms\.0"):
        st.stitch(a, b, "nope", data=x40)
    with pytest.raises(ValueError, match="'svd'"):
        st.stitch(a, b, "norms.0", data=x40, init="svd")
    with pytest.raises(ValueError, match="'identity'"):
        st.stitch(a, b, "norms.0", data=x40, kind="permutation", init="identity")
    wide = build(prb.zoo.MLP, width=64, depth=3)
    with pytest.raises(ValueError, match="32 -> 64"):
        st.stitch(a, wide, "norms.0", data=x40, kind="permutation")
    st.stitch(a, wide, "norms.0", data=x40, kind="semi_match")  # many-to-one is fine
    s = st.stitch(wide, a, "norms.0", data=x40, kind="permutation")  # 64 -> 32: rectangular LAP
    assert len(set(s.layer.source.tolist())) == 32
    with pytest.raises(ValueError, match="differ in rank"):
        st.stitch(a, build(prb.zoo.VGG), "norms.0", "features.2", data=x40)
    vgg = build(prb.zoo.VGG)
    with pytest.raises(ValueError, match=r"\[2, 16, 40\] and end activation \[2, 32, 20\] must agree"):
        st.stitch(vgg, vgg, "features.2", "features.9", data=x40)
    s = st.stitch(a, b, "norms.0", data=x40)
    with pytest.raises(ValueError, match="needs labels"):
        st.train_stitch_(s, x40, progress=False)
    with pytest.raises(ValueError, match="'mse'"):
        st.train_stitch_(s, x40, targets="mse", progress=False)
    with pytest.raises(TypeError, match="int"):
        st.stitch(a, b, "norms.0", data=3)
    with pytest.raises(TypeError, match="one-shot iterator"):
        st.stitch(a, b, "norms.0", data=iter([x40]))


def test_batch_lists_and_tensors_give_the_same_stitch(mlp_pair, x40):
    a, b, _ = mlp_pair
    y = torch.randint(0, 10, (256,))
    s1 = st.stitch(a, b, "norms.1", data=(x40, y))
    s2 = st.stitch(a, b, "norms.1", data=[(x40[i:i + 50], y[i:i + 50]) for i in range(0, 256, 50)])
    torch.testing.assert_close(s1.layer.weight, s2.layer.weight, rtol=1e-5, atol=1e-6)
    m1, m2 = st.evaluate_stitch(s1, (x40, y)).to_dict(), st.evaluate_stitch(s2, [(x40, y)]).to_dict()
    assert m1 == pytest.approx(m2, rel=1e-5)


def test_candidate_layers_cover_the_zoo():
    assert st.candidate_layers(prb.zoo.MLP(width=8, depth=2)) == ["norms.0", "norms.1"]
    assert st.candidate_layers(prb.zoo.VGG()) == ["features.2", "features.5", "features.9", "features.12",
                                                  "features.16", "fc1"]
    assert st.candidate_layers(prb.zoo.ResNet20(blocks_per_stage=1)) == ["norm1", "stages.0.0", "stages.1.0", "stages.2.0"]
    assert st.candidate_layers(prb.zoo.Transformer(layers=2)) == ["blocks.0", "blocks.1"]
    assert st.candidate_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))) == ["1"]
    with pytest.raises(ValueError, match="explicitly"):
        st.candidate_layers(nn.Linear(2, 3))


def test_any_model_can_name_its_stitch_points_and_channel_dim():
    # the protocol the zoo implements, on a model stitching has never heard of: tokens [B, T, C]
    class Tokens(nn.Module):
        stitch_channel_dim = -1

        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.inner(x.view(len(x), 5, 4))).mean(1)

        def stitch_points(self):
            return ["inner"]

    torch.manual_seed(0)
    a, b, x = Tokens(), Tokens(), torch.randn(64, 20)
    assert isinstance(a, st.Stitchable) and st.candidate_layers(a) == ["inner"]
    s = st.stitch(a, b, "inner", data=x)
    assert s.layer.channel_dim == -1 and (s.layer.c_in, s.layer.c_out) == (6, 6)
    assert st.channel_dim_of(nn.Linear(2, 2), 4) == 1 and st.channel_dim_of(nn.Linear(2, 2), 3) == 1
    a.stitch_channel_dim = "last"
    with pytest.raises(TypeError, match="stitch_channel_dim must be an int, got 'last'"):
        st.channel_dim_of(a, 3)
    a.stitch_points = lambda: []
    with pytest.raises(ValueError, match=r"stitch_points\(\) must return module paths"):
        st.candidate_layers(a)


def test_non_tensor_outputs_and_unknown_paths_are_named():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x), x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.head = Pair(), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.pair(x)[0])

    net, x = Net(), torch.randn(8, 4)
    with pytest.raises(ValueError, match="'pair' outputs a tuple"):
        st.stitch(net, net, "pair", data=x)
    with pytest.raises(ValueError, match=r"submodules: \['pair', 'pair.lin', 'head'\]"):
        st.stitch(net, net, "lin", data=x)
    torch.testing.assert_close(st.stitch(net, net, "pair.lin", data=x)(x), net(x))


# --- real data (the paper's claims) ------------------------------------------------------------------

@pytest.mark.slow
def test_least_squares_stitching_keeps_accuracy_at_every_layer_identity_does_not():
    cfg = prb.train.TrainConfig(epochs=10)
    a, _ = prb.train.train_zoo("mlp", seed=0, config=cfg, width=128, depth=3, progress=False)
    b, _ = prb.train.train_zoo("mlp", seed=1, config=cfg, width=128, depth=3, progress=False)
    x, y, xt, yt = prb.data.mnist1d()
    for layer in st.candidate_layers(a):
        ls = st.stitch(a, b, layer, data=x, kind="affine", init="least_squares")
        st.train_stitch_(ls, (x, y), epochs=2, progress=False)
        ident = st.stitch(a, b, layer, data=x, kind="affine", init="identity")
        m_ls, m_id = st.evaluate_stitch(ls, (xt, yt)), st.evaluate_stitch(ident, (xt, yt))
        assert m_ls.relative_accuracy > 0.9, (layer, m_ls)
        assert m_id.relative_accuracy < 0.5 and m_id.agreement < 0.5, (layer, m_id)
        assert m_ls.r2 > 0.9


@pytest.mark.slow
def test_least_squares_1x1_conv_stitching_between_vgg_seeds():
    cfg = prb.train.TrainConfig(epochs=5)
    a, _ = prb.train.train_zoo("vgg", seed=0, config=cfg, progress=False)
    b, _ = prb.train.train_zoo("vgg", seed=1, config=cfg, progress=False)
    x, y, xt, yt = prb.data.mnist1d()
    s = st.stitch(a, b, "features.9", data=x[:2000], init="least_squares")
    assert s.layer.channel_dim == 1
    m0 = st.evaluate_stitch(s, (xt, yt))
    ident = st.evaluate_stitch(st.stitch(a, b, "features.9", data=x[:256], init="identity"), (xt, yt))
    assert m0.relative_accuracy > 0.9 and ident.relative_accuracy < 0.5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stitch_on_cuda_matches_cpu(mlp_pair, x40):
    a, b, _ = mlp_pair
    cpu = st.stitch(a, b, "norms.1", data=x40, kind="orthogonal", init="procrustes")
    gpu = st.stitch(a.cuda(), b.cuda(), "norms.1", data=x40.cuda(), kind="orthogonal", init="procrustes")
    a.cpu(), b.cpu()
    torch.testing.assert_close(gpu(x40.cuda()).cpu(), cpu(x40), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("widths", [(64, 32), (32, 64)])
def test_rectangular_orthogonal_stitch_stays_semi_orthogonal_while_training(widths, x40):
    a, b = build(prb.zoo.MLP, width=widths[0], depth=2), build(prb.zoo.MLP, width=widths[1], depth=2)
    y = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(2))
    s = st.stitch(a, b, "norms.1", data=(x40, y), kind="orthogonal", init="procrustes")
    st.train_stitch_(s, (x40, y), epochs=2, lr=1e-2, progress=False)
    q = s.layer.rotation.weight.detach()
    gram = q @ q.T if q.shape[0] <= q.shape[1] else q.T @ q
    torch.testing.assert_close(gram, torch.eye(min(widths)), atol=1e-5, rtol=0)
    assert q.shape == (widths[1], widths[0]) and float(s.layer.scale.detach()) > 0
