"""RESET and REPAIR: RESET equals PyTorch's own train-mode pass with momentum=None; after REPAIR every
repair point's per-channel mean/std equal the interpolated endpoint statistics (BN, LN, norm-free,
conv, residual and attention nets). REPAIR's real-data claim lives in tests/claims/test_repair.py."""
import copy

import pytest
import torch
from torch import nn

import pyrebasin as prb
from pyrebasin.module_state import lerp_state
from pyrebasin.repair import endpoint_stats, find_points, repair, reset_bn

MODELS = {
    "mlp": lambda: prb.zoo.MLP(12, 24, 3, classes=5),
    "mlp_ln": lambda: prb.zoo.MLP(12, 24, 2, classes=5, norm="ln"),
    "mlp_bn": lambda: prb.zoo.MLP(12, 24, 2, classes=5, norm="bn"),
    "vgg_bn": lambda: prb.zoo.VGG(input_size=16, cfg=(8, "M", 16, "M"), hidden=24, classes=5),
    "vgg_plain": lambda: prb.zoo.VGG(input_size=16, cfg=(8, "M", 16, "M"), hidden=24, classes=5, norm=None),
    "resnet_ln": lambda: prb.zoo.ResNet20(norm="ln", classes=5, blocks_per_stage=1),
    "resnet_plain": lambda: prb.zoo.ResNet20(norm=None, classes=5, blocks_per_stage=1),
    "transformer": lambda: prb.zoo.Transformer(seq_len=16, patch=4, d_model=16, heads=2, layers=1, classes=5),
}
IN_DIM = {"mlp": 12, "mlp_ln": 12, "mlp_bn": 12}


def pair(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    b = MODELS[name]().state_dict()
    x = torch.randn(300, IN_DIM.get(name, 16), generator=torch.Generator().manual_seed(2))
    if name.startswith("resnet"):
        x = x[:, :16]
    return model, a, b, x


def test_find_points():
    names = lambda m, s, x: [(p.name, p.kind, p.channel_dim) for p in find_points(m, s, x)]  # noqa: E731
    m, a, _, x = pair("mlp")
    assert names(m, a, x[:2]) == [("layers.0", "affine", -1), ("layers.1", "affine", -1), ("layers.2", "affine", -1)]
    m, a, _, x = pair("mlp_bn")
    assert names(m, a, x[:2]) == [("norms.0", "bn", 1), ("norms.1", "bn", 1)]
    m, a, _, x = pair("vgg_bn")  # BN after each conv; fc1 has no BN, so it is rescaled itself
    assert names(m, a, x[:2]) == [("features.1", "bn", 1), ("features.5", "bn", 1), ("fc1", "affine", -1)]
    m, a, _, x = pair("resnet_ln")  # bias-free convs, each followed by a GroupNorm: fold into its affine
    got = [p.name for p in find_points(m, a, x[:2])]
    assert got[:3] == ["norm1", "stages.0.0.norm1", "stages.0.0.norm2"] and "stages.1.0.shortcut.1" in got
    assert not any(n.endswith(("conv1", "conv2", "shortcut.0")) or n == "linear" for n in got)
    assert all(p.kind == "affine" and p.channel_dim == 1 for p in find_points(m, a, x[:2]))
    m, a, _, x = pair("resnet_plain")  # norm-free: the convs themselves, never the classifier
    got = [p.name for p in find_points(m, a, x[:2])]
    assert "conv1" in got and "stages.1.0.shortcut.0" in got and "linear" not in got
    m, a, _, x = pair("transformer")
    got = [p.name for p in find_points(m, a, x[:2])]
    assert {"embed", "blocks.0.ln1", "blocks.0.attn.q_proj", "blocks.0.fc2", "ln_f"} <= set(got)
    assert "head" not in got


def test_reset_bn_equals_torch_train_mode_pass():
    model, a, b, x = pair("vgg_bn")
    mid = lerp_state(a, b, 0.4)
    before = {k: v.clone() for k, v in mid.items()}
    got = reset_bn(model, mid, x, batch_size=150)  # two equal batches
    ref = copy.deepcopy(model)
    ref.load_state_dict(mid)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average, what RESET means
    ref.train()
    with torch.no_grad():
        for xb in x.split(150):
            ref(xb)
    for name, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm1d):
            per_batch = 150 * (16 if name == "features.1" else 8)  # batch x positions (after pooling)
            torch.testing.assert_close(got[f"{name}.running_mean"], m.running_mean, rtol=1e-5, atol=1e-6)
            # torch stores the unbiased batch variance; RESET stores the population one
            torch.testing.assert_close(got[f"{name}.running_var"], m.running_var * (per_batch - 1) / per_batch,
                                       rtol=1e-5, atol=1e-6)
    for k in mid:
        assert torch.equal(mid[k], before[k])  # input untouched
        if not k.endswith(("running_mean", "running_var")):
            assert torch.equal(got[k], mid[k]), k  # weights unchanged


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("t", [0.0, 0.35])
def test_repaired_statistics_match_targets(name, t):
    model, a, b, x = pair(name)
    model.eval()
    stats = endpoint_stats(model, a, b, x)
    # one batch: exact statistics; a tiny eps so that low-variance channels of these random nets are
    # not shrunk by the normaliser's eps (BatchNorm points keep the module's own eps)
    out = repair(model, a, b, t, x, stats=stats, batch_size=len(x), eps=1e-9)
    measured = endpoint_stats(model, out, out, x)
    assert [p.name for p in measured.points] == [p.name for p in stats.points]
    for p, (mean, std) in stats.targets(t).items():
        torch.testing.assert_close(measured.mean_a[p], mean, rtol=1e-3, atol=2e-3, msg=lambda m: f"{p}: {m}")
        torch.testing.assert_close(measured.std_a[p], std, rtol=1e-3, atol=1e-3 * float(std.max()),
                                   msg=lambda m: f"{p}: {m}")


def test_repair_with_several_batches_is_close():
    model, a, b, x = pair("mlp")
    stats = endpoint_stats(model, a, b, x, batch_size=64)
    out = repair(model, a, b, 0.5, x, stats=stats, batch_size=75)
    measured = endpoint_stats(model, out, out, x)
    for p, (mean, std) in stats.targets(0.5).items():
        assert (measured.std_a[p] - std).abs().max() < 0.05 * std.max()
        assert (measured.mean_a[p] - mean).abs().max() < 0.05 * std.max()


def test_repair_at_an_endpoint_keeps_the_function():
    model, a, b, x = pair("mlp")
    out = repair(model, a, b, 0.0, x, batch_size=len(x))
    fa = torch.func.functional_call(model, a, (x,))
    fo = torch.func.functional_call(model, out, (x,))
    torch.testing.assert_close(fo, fa, rtol=1e-3, atol=1e-3)


def test_endpoint_stats_stream_over_batches():
    model, a, b, x = pair("vgg_bn")
    whole = endpoint_stats(model, a, b, x, batch_size=len(x))
    parts = endpoint_stats(model, a, b, x, batch_size=110)
    for p in whole.points:
        torch.testing.assert_close(parts.mean_b[p.name], whole.mean_b[p.name])
        torch.testing.assert_close(parts.std_a[p.name], whole.std_a[p.name])


def test_errors():
    model, a, b, x = pair("mlp")
    with pytest.raises(ValueError, match="no BatchNorm"):
        reset_bn(model, a, x)
    with pytest.raises(ValueError, match="nope.*not modules"):
        repair(model, a, b, 0.5, x, points=["nope"])
    with pytest.raises(ValueError, match="is a ReLU"):
        endpoint_stats(nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2)),
                       *[nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict()] * 2,
                       x, points=["1"])
    no_bias = nn.Sequential(nn.Linear(12, 8, bias=False), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="'0'.*no bias"):
        repair(no_bias, no_bias.state_dict(), no_bias.state_dict(), 0.5, x)
    with pytest.raises(TypeError, match="statistics data"):
        repair(model, a, b, 0.5, [1, 2])
