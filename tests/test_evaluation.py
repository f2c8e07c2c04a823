"""The one batched evaluator behind interpolate, evaluate_combinations and REPAIR/RESET: one t convention,
one data convention, corrections, and the silent-wrong-result classes of bad input (each named)."""
import ast
import math
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import pyrebasin as prb
from pyrebasin import _chain
from pyrebasin.coefficients import Distribution
from pyrebasin.lmc import interpolate
from pyrebasin.repair import RepairCorrection, ResetCorrection, repair, reset_bn


def mlp(norm=None, seed=0, width=16):
    torch.manual_seed(seed)
    return prb.zoo.MLP(12, width, 2, classes=4, norm=norm)


def pair(norm=None):
    m = mlp(norm)
    return m, {k: v.clone() for k, v in m.state_dict().items()}, mlp(norm, seed=1).state_dict()


def toy(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def reference_loss(model, state, x, y):
    ref = mlp(None if not any(isinstance(m, nn.BatchNorm1d) for m in model.modules()) else "bn", seed=9)
    ref.load_state_dict(state)
    return prb.train.evaluate(ref.eval(), x, y)


# ---------------------------------------------------------------- one t convention, one evaluator
@pytest.mark.parametrize("norm", [None, "bn"])
def test_curve_point_t_is_the_combination_lambda_one_minus_t(norm):
    m, a, b = pair(norm)
    x, y = toy()
    ts = [0.0, 0.25, 0.6, 1.0]
    curve = interpolate(m, a, b, (x, y), ts)
    comb = prb.evaluate_combinations(m, a, b, [1 - t for t in ts], (x, y))
    assert curve.loss["data"] == pytest.approx(comb.loss.tolist(), rel=1e-5)
    assert curve.accuracy["data"] == pytest.approx(comb.accuracy.tolist())
    assert curve.loss["data"][0] == pytest.approx(reference_loss(m, a, x, y)[0], rel=1e-6)   # t = 0 is A


def test_every_data_form_gives_the_same_numbers():
    m, a, b = pair("bn")
    x, y = toy(60)
    forms = {"pair": (x, y), "batches": [(x[:25], y[:25]), (x[25:], y[25:])],
             "loader": DataLoader(TensorDataset(x, y), batch_size=16), "splits": {"data": (x, y)}}
    want = interpolate(m, a, b, (x, y), 3, buffers="reset", stat_data=x)
    want_c = prb.evaluate_combinations(m, a, b, [1.0, 0.5], (x, y))
    for name, data in forms.items():
        got = interpolate(m, a, b, data, 3, buffers="reset", stat_data=x)
        assert got.loss["data"] == pytest.approx(want.loss["data"], rel=1e-5), name
        assert got.accuracy["data"] == pytest.approx(want.accuracy["data"]), name
        if name != "splits":
            r = prb.evaluate_combinations(m, a, b, [1.0, 0.5], data)
            assert r.loss.tolist() == pytest.approx(want_c.loss.tolist(), rel=1e-5), name
    # statistics data: inputs alone, (x, y), batches of x or of (x, y), a DataLoader: one RESET (a
    # list of exactly two tensors is an (x, y) pair, as a DataLoader's [x, y] items are)
    for stat in ((x, y), [x[:30], x[30:45], x[45:]], [(x[:30],), (x[30:],)], [(x[:30], y[:30]), (x[30:], y[30:])],
                 DataLoader(TensorDataset(x, y), batch_size=30)):
        got = interpolate(m, a, b, (x, y), 3, buffers="reset", stat_data=stat, batch_size=30)
        ref = interpolate(m, a, b, (x, y), 3, buffers="reset", stat_data=x, batch_size=30)
        tol = 1e-5 if len(stat) != 3 else 0.05   # 30/15/15 batches: other batch statistics, same data
        assert got.loss["data"] == pytest.approx(ref.loss["data"], rel=tol), type(stat)
    with pytest.raises(TypeError, match="one-shot"):
        ResetCorrection(m, iter([x]))   # read once per point
    assert reset_bn(m, a, iter([x])).keys() == a.keys()   # one pass: an iterator is fine


def test_corrections_plug_into_both_entry_points():
    m, a, b = pair("bn")
    x, y = toy(80)
    fix = RepairCorrection(m, a, b, x)
    by_flag = interpolate(m, a, b, (x, y), [0.0, 0.5, 1.0], repair=True, stat_data=x)
    by_obj = interpolate(m, a, b, (x, y), [0.0, 0.5, 1.0], correction=fix)
    by_comb = prb.evaluate_combinations(m, a, b, [1.0, 0.5, 0.0], (x, y), correction=fix)
    assert by_obj.loss["data"] == pytest.approx(by_flag.loss["data"], rel=1e-6)
    assert by_comb.loss.tolist() == pytest.approx(by_flag.loss["data"], rel=1e-5)
    reset = prb.evaluate_combinations(m, a, b, [0.5], (x, y), correction=ResetCorrection(m, x))
    assert reset.loss[0] == pytest.approx(interpolate(m, a, b, (x, y), [0.5], buffers="reset",
                                                      stat_data=x).loss["data"][0], rel=1e-5)
    coef = prb.sample_coefficients(a, 2, "uniform", "element")
    with pytest.raises(ValueError, match="path position t"):
        prb.evaluate_combinations(m, a, b, coef, (x, y), correction=fix)


def test_custom_loss_hook_replaces_cross_entropy():
    m, a, b = pair()
    x, y = toy()

    def per_example(out, y):
        return F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]), reduction="none").view(out.shape[0], -1)

    plain = interpolate(m, a, b, (x, y), 3)
    hooked = interpolate(m, a, b, (x, y), 3, loss=per_example)
    assert hooked.loss["data"] == pytest.approx(plain.loss["data"], rel=1e-5) and hooked.accuracy == {}
    with pytest.raises(ValueError, match=r"per-example losses \[K, B\]"):
        interpolate(m, a, b, (x, y), 3, loss=lambda out, y: out.sum())


def test_repair_does_not_import_lmc():
    tree = ast.parse(Path(prb.repair.__code__.co_filename).read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "lmc" not in names and "evaluation" not in names


# ---------------------------------------------------------------- bad input classes (issue 12 §3)
@pytest.mark.parametrize("bad", [-1, 0, 1.5, 2.0, True, "8"])
def test_non_positive_float_bool_batch_size_and_chunk_are_refused(bad):
    m, a, b = pair("bn")
    data = toy()
    c = prb.sample_coefficients(a, 2)
    for call in (lambda: interpolate(m, a, b, data, 3, batch_size=bad),
                 lambda: interpolate(m, a, b, data, 3, chunk=bad),
                 lambda: prb.evaluate_combinations(m, a, b, c, data, chunk=bad),
                 lambda: prb.evaluate_combinations(m, a, b, c, data, batch_size=bad),
                 lambda: reset_bn(m, a, data[0], batch_size=bad),
                 lambda: repair(m, a, b, 0.5, data[0], batch_size=bad)):
        with pytest.raises(ValueError, match="batch_size|chunk"):
            call()


def test_nan_inf_in_weights_or_inputs_are_refused_naming_key_or_batch():
    m, a, b = pair()
    x, y = toy()
    nan_b = {**b, "layers.1.bias": b["layers.1.bias"].clone().index_fill_(0, torch.tensor([3]), math.nan)}
    c = prb.sample_coefficients(a, 2)
    with pytest.raises(ValueError, match="state_b.*layers.1.bias.*non-finite"):
        interpolate(m, a, nan_b, (x, y), 3)   # lerp(a, nan, 0) is nan: t = 0 would be poisoned
    with pytest.raises(ValueError, match="state_b.*layers.1.bias"):
        prb.evaluate_combinations(m, a, nan_b, c, (x, y))
    with pytest.raises(ValueError, match="state_a.*layers.1.bias"):
        prb.combine_states(nan_b, a, c)
    bad_x = x.clone()
    bad_x[30, 2] = math.inf
    with pytest.raises(ValueError, match="batch 1.*non-finite"):
        interpolate(m, a, b, (bad_x, y), 3, batch_size=20)
    with pytest.raises(ValueError, match="batch 1.*non-finite"):
        prb.evaluate_combinations(m, a, b, c, [(x[:20], y[:20]), (bad_x[20:], y[20:])])
    with pytest.raises(ValueError, match="non-finite"):
        prb.evaluate_combinations(m, a, b, [0.5, math.nan], (x, y))


@pytest.mark.parametrize("text", ["constant(nan)", "gaussian(nan, 0.1)", "uniform(0, inf)", "beta(inf, 1)",
                                  "bernoulli(nan)", "gaussian(0.5, 0.1, nan, 1)", "uniform(0,,1)", "uniform(,)"])
def test_non_finite_or_malformed_distribution_parameters_are_refused(text):
    with pytest.raises(ValueError):
        Distribution.parse(text)


def test_distribution_parameters_keep_unclipped_gaussians():
    assert Distribution.parse("gaussian(0.5, 0.1)").params[2:] == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="finite"):
        Distribution("constant", (math.nan,))
    with pytest.raises(TypeError):
        Distribution("constant", (True,))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_float_and_out_of_range_seeds_are_refused_by_both_backends(backend):
    if backend == "native" and not prb.native_available():
        pytest.skip("native extension not built")
    _, a, b = pair()
    with prb.use_backend(backend):
        for bad in (1.5, 2.0, True, "3"):
            with pytest.raises(TypeError, match="seed"):
                prb.sample_coefficients(a, 2, seed=bad)
        for bad in (-1, 2**63, 2**64 + 5):
            with pytest.raises(ValueError, match=r"seed.*2\^63"):
                prb.sample_coefficients(a, 2, seed=bad)
        top = prb.combine_states(a, b, prb.sample_coefficients(a, 2, seed=2**63 - 1))
    with prb.use_backend("reference"):
        want = prb.combine_states(a, b, prb.sample_coefficients(a, 2, seed=2**63 - 1))
    assert all(torch.equal(top[k], want[k]) for k in want)


class Steered(nn.Module):
    """A Linear chain whose activation is chosen by attributes: a string, a function, an object's field."""

    class Config:
        act = "relu"

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 4)
        self.act, self.fn, self.cfg = "relu", torch.relu, Steered.Config()

    def forward(self, x):
        h = self.fc1(x)
        h = torch.relu(h) if self.act == "relu" else torch.tanh(h)
        h = self.fn(h)
        return self.fc2(h if self.cfg.act == "relu" else torch.sigmoid(h))


@pytest.mark.parametrize("change", ["string", "function", "object field (not in the key: the probe catches it)"])
def test_chain_cache_cannot_go_stale_when_an_attribute_steers_forward(change):
    m = Steered()
    a = m.state_dict()
    x, y = toy()
    before = prb.evaluate_combinations(m, a, a, [1.0], (x, y)).loss
    assert _chain.linear_chain(m) is not None
    if change == "string":
        m.act = "tanh"
    elif change == "function":
        m.fn = torch.tanh
    else:
        m.cfg.act = "sigmoid"
    with torch.no_grad():
        want = F.cross_entropy(m(x), y).item()
    for r in (prb.evaluate_combinations(m, a, a, [1.0], (x, y)).loss[0], interpolate(m, a, a, (x, y), 2).loss["data"][0]):
        assert float(r) == pytest.approx(want, rel=1e-5)
        assert float(r) != pytest.approx(float(before[0]), rel=1e-3)


class TrainBranch(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        out = super().forward(x)
        return out * 0 if self.training else out   # train mode would give uniform logits


def test_train_mode_model_branching_on_training_is_evaluated_in_eval_mode():
    m = TrainBranch()
    a = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = toy()
    with torch.no_grad():
        want = F.cross_entropy(m.eval()(x), y).item()
    m.train()
    _chain.forget(m)
    assert _chain.linear_chain(m) is not None          # traced on the eval-mode view
    got = [prb.evaluate_combinations(m, a, a, [1.0], (x, y)).loss[0].item(),
           interpolate(m, a, a, (x, y), 2).loss["data"][0]]
    assert got == pytest.approx([want, want], rel=1e-5) and want != pytest.approx(math.log(4))
    assert all(mod.training for mod in m.modules())


def test_repair_reset_with_one_sample_or_batch_size_one_are_refused():
    m, a, b = pair("bn")
    x, _ = toy()
    with pytest.raises(ValueError, match="1 value per channel"):
        reset_bn(m, a, x, batch_size=1)                 # running_var would be 0
    with pytest.raises(ValueError, match="1 value per channel|at least 2 samples"):
        repair(m, a, b, 0.5, x[:1])                     # BN weights (target std) would be 0
    with pytest.raises(ValueError, match="value per channel"):
        interpolate(m, a, b, toy(), 3, buffers="reset", stat_data=x, batch_size=1)
    vgg = prb.zoo.VGG(input_size=16, cfg=(8, "M"), hidden=12, classes=4)  # positions give > 1 value
    out = reset_bn(vgg, vgg.state_dict(), torch.randn(5, 16), batch_size=1)
    assert all(float(v.min()) > 0 for k, v in out.items() if k.endswith("running_var"))


@pytest.mark.parametrize("t", [math.nan, math.inf, -math.inf])
def test_repair_non_finite_t_is_refused(t):
    m, a, b = pair()
    with pytest.raises(ValueError, match="t must be finite"):
        repair(m, a, b, t, toy()[0])
    with pytest.raises(ValueError, match="ts must"):
        interpolate(m, a, b, toy(), [0.0, t])
    with pytest.raises(ValueError, match="eps must be finite"):
        repair(m, a, b, 0.5, toy()[0], eps=t)


def test_huge_chunk_reports_the_memory_it_would_need():
    m, a, b = pair()
    c = prb.sample_coefficients(a, 2**31, "uniform")      # lazy: nothing is drawn
    with pytest.raises(ValueError, match=r"chunk=2147483648: .* need \d+ bytes"):
        prb.evaluate_combinations(m, a, b, c, toy(), chunk=2**31)


def test_interpolate_from_two_threads_leaves_a_train_mode_model_in_train_mode():
    m, a, b = pair("bn")
    m.train()
    data = toy(200)
    want = interpolate(m, a, b, data, 5, batch_size=50)
    plain, reset, errors = [], [], []

    def run():
        try:
            for _ in range(3):
                reset.append(interpolate(m, a, b, data, 5, batch_size=50, buffers="reset", stat_data=data[0]))
                plain.append(interpolate(m, a, b, data, 5, batch_size=50))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and all(mod.training for mod in m.modules())
    assert len(plain) == 6 and all(r.loss == want.loss for r in plain)
    assert len({tuple(r.loss["data"]) for r in reset}) == 1
    assert not any(mod._forward_hooks for mod in m.modules())


def test_mode_view_shares_tensors_and_nothing_else():
    from pyrebasin.module_state import mode_view

    shared = nn.Linear(4, 4)
    m = nn.Sequential(shared, nn.BatchNorm1d(4), shared).train()
    v = mode_view(m)
    assert not v.training and not any(x.training for x in v.modules()) and all(x.training for x in m.modules())
    assert v[0] is v[2] and v[0] is not shared and v[0].weight is shared.weight
    v[1].register_forward_hook(lambda *args: None)
    v[0].weight = nn.Parameter(torch.zeros(4, 4))   # rebinding on the view leaves the caller's module
    assert not m[1]._forward_hooks and shared.weight.abs().sum() > 0
