"""Interpolation curves and barriers: hand-computed barriers on synthetic curves (any_chord against a
brute-force chord search), functional evaluation that never touches the caller's model. The papers'
claims on mnist1d-trained pairs live in tests/claims/test_lmc.py."""
import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyrebasin as prb
from pyrebasin.lmc import Curve, barrier, interpolate, lerp_state
from pyrebasin.train import evaluate
from tests.claims._pairs import mnist1d_splits, trained_pair  # noqa: F401  (re-exported for tests.test_cli)


def curve(ts, loss, acc=None):
    return Curve(list(ts), {"s": list(loss)}, {"s": list(acc if acc is not None else loss)})


# ---------------------------------------------------------------- barriers
def test_barriers_hand_computed():
    c = curve([0, 0.5, 1], [1, 3, 2])
    assert barrier(c, kind="endpoint_mean") == pytest.approx(1.5)   # 3 - (1+2)/2
    assert barrier(c, kind="linear") == pytest.approx(1.5)          # 3 - 1.5 at t=0.5
    assert barrier(c, kind="any_chord") == pytest.approx(1.5)
    # monotone slope: endpoint_mean sees the higher endpoint, linear and any_chord see no barrier
    c = curve([0, 0.5, 1], [1, 2, 3])
    assert barrier(c, kind="endpoint_mean") == pytest.approx(1.0)
    assert barrier(c, kind="linear") == pytest.approx(0.0)
    assert barrier(c, kind="any_chord") == pytest.approx(0.0)


def test_barriers_uneven_and_nonconvex():
    # chord from 0 to 1 is 4t; rises at the points: 0, 1, -1, 0, 0
    c = curve([0, 0.25, 0.5, 0.75, 1], [0, 2, 1, 3, 4])
    assert barrier(c, kind="endpoint_mean") == pytest.approx(2.0)
    assert barrier(c, kind="linear") == pytest.approx(1.0)
    # lower hull (0,0)-(.5,1)-(1,4): the point (.25, 2) sits 1.5 above it, (.75, 3) 0.5 above
    assert barrier(c, kind="any_chord") == pytest.approx(1.5)
    # a bump that stays below the endpoint chord: only any_chord sees it
    c = curve([0, 0.25, 0.5, 0.75, 1], [4, 1, 2, 0, 4])
    assert barrier(c, kind="endpoint_mean") == pytest.approx(0.0)
    assert barrier(c, kind="linear") == pytest.approx(0.0)
    assert barrier(c, kind="any_chord") == pytest.approx(1.5)  # 2 - chord (.25,1)-(.75,0) at .5


def test_accuracy_barriers_flip_sign():
    c = curve([0, 0.5, 1], [0, 0, 0], [0.9, 0.5, 0.8])
    assert barrier(c, "accuracy", "endpoint_mean") == pytest.approx(0.35)
    assert barrier(c, "accuracy", "linear") == pytest.approx(0.35)
    assert barrier(c, "accuracy", "any_chord") == pytest.approx(0.35)
    c = curve([0, 0.5, 1], [0, 0, 0], [0.9, 0.95, 0.8])  # accuracy rising mid-way: no barrier
    assert barrier(c, "accuracy", "linear") == pytest.approx(0.0)
    assert barrier(c, "accuracy", "any_chord") == pytest.approx(0.0)


def brute_any_chord(ts, vs):
    best = 0.0
    for i, j in itertools.combinations(range(len(ts)), 2):
        for k in range(i + 1, j):
            chord = vs[i] + (ts[k] - ts[i]) / (ts[j] - ts[i]) * (vs[j] - vs[i])
            best = max(best, vs[k] - chord)
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=12),
       st.lists(st.floats(0.01, 1.0), min_size=12, max_size=12))
def test_any_chord_matches_brute_force(vs, gaps):
    ts = [0.0]
    for g in gaps[:len(vs) - 1]:
        ts.append(ts[-1] + g)
    got = barrier(curve(ts, vs), kind="any_chord")
    assert got == pytest.approx(brute_any_chord(ts, vs), abs=1e-9)
    assert got >= 0


def test_barrier_errors():
    c = curve([0, 0.5, 1], [1, 3, 2])
    with pytest.raises(ValueError, match="kind="):
        barrier(c, kind="max")
    with pytest.raises(ValueError, match="metric="):
        barrier(c, metric="error")
    with pytest.raises(ValueError, match="strictly increasing"):
        barrier(curve([0, 0.5, 0.5, 1], [1, 2, 2, 1]))
    with pytest.raises(ValueError, match="endpoints"):
        barrier(curve([0.1, 0.5, 1], [1, 2, 1]), kind="linear")
    assert barrier(curve([0.1, 0.5, 1], [1, 2, 1]), kind="any_chord") == pytest.approx(1.0)
    two = Curve([0, 1], {"train": [1, 1], "test": [1, 2]}, {"train": [1, 1], "test": [1, 1]})
    with pytest.raises(ValueError, match="split="):
        barrier(two)
    assert barrier(two, split="test") == pytest.approx(0.5)


def test_curve_json_round_trip():
    c = Curve([0.0, 1.0], {"train": [1.0, 2.0]}, {"train": [0.5, 0.25]}, {"buffers": "reset"})
    back = Curve.from_json(c.to_json())
    assert back == c
    assert json.loads(c.to_json())["meta"] == {"buffers": "reset"}


# ---------------------------------------------------------------- interpolate
def small_model(norm=None, seed=0):
    torch.manual_seed(seed)
    return prb.zoo.MLP(12, 16, 2, classes=4, norm=norm)


def toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("norm", [None, "bn", "ln"])
def test_endpoints_and_midpoint_match_a_loaded_model(norm):
    model = small_model(norm)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = small_model(norm, seed=1).state_dict()
    x, y = toy_data()
    c = interpolate(model, a, b, (x, y), ts=[0.0, 0.3, 1.0], batch_size=20)
    for t, loss, acc in zip(c.ts, c.loss["data"], c.accuracy["data"]):
        ref = small_model(norm, seed=5)
        ref.load_state_dict(lerp_state(a, b, t))
        ref_loss, ref_acc = evaluate(ref, x, y)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert acc == pytest.approx(ref_acc)


def test_caller_model_and_states_untouched():
    model = small_model("bn")
    model.train()  # the caller's mode must come back, and BN must not update its running stats
    own = {k: v.clone() for k, v in model.state_dict().items()}
    a = {k: v.clone() for k, v in own.items()}
    b = {k: v + 0.5 if v.is_floating_point() else v.clone() for k, v in own.items()}
    b_before = {k: v.clone() for k, v in b.items()}
    x, y = toy_data()
    interpolate(model, a, b, {"train": (x, y), "test": toy_data(seed=1)}, ts=5, buffers="reset")
    interpolate(model, a, b, (x, y), ts=3, repair=True)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k
    for k in b:
        assert torch.equal(b[k], b_before[k]) and torch.equal(a[k], own[k]), k


@pytest.mark.parametrize("norm", [None, "bn"])
def test_vmap_and_loop_agree(norm):
    model = small_model(norm)
    a = model.state_dict()
    b = small_model(norm, seed=1).state_dict()
    data = toy_data(50)
    loop = interpolate(model, a, b, data, ts=7, vmap_ts=False, batch_size=16)
    stacked = interpolate(model, a, b, data, ts=7, vmap_ts=True, chunk=3, batch_size=16)
    assert stacked.ts == loop.ts
    assert stacked.loss["data"] == pytest.approx(loop.loss["data"], rel=1e-5)
    assert stacked.accuracy["data"] == loop.accuracy["data"]


def test_ts_forms():
    model = small_model()
    a, b = model.state_dict(), small_model(seed=1).state_dict()
    c = interpolate(model, a, b, toy_data(), ts=5)
    assert c.ts == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert c.ts[0] == 0.0 and c.ts[-1] == 1.0
    c = interpolate(model, a, b, toy_data(), ts=[-0.5, 1.5])  # extrapolation is allowed
    assert len(c.loss["data"]) == 2


def test_bad_inputs_name_the_problem():
    model = small_model()
    a, b = model.state_dict(), small_model(seed=1).state_dict()
    data = toy_data()
    with pytest.raises(ValueError, match="missing keys.*head.bias"):
        interpolate(model, a, {k: v for k, v in b.items() if k != "head.bias"}, data)
    with pytest.raises(ValueError, match=r"layers.0.weight.*\[16, 13\]"):
        interpolate(model, a, {**b, "layers.0.weight": torch.zeros(16, 13)}, data)
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        interpolate(model, {**a, "extra": torch.zeros(1)}, b, data)
    with pytest.raises(TypeError, match="data"):
        interpolate(model, a, b, data[0])
    with pytest.raises(ValueError, match="rows"):
        interpolate(model, a, b, (data[0], data[1][:5]))
    with pytest.raises(ValueError, match="buffers="):
        interpolate(model, a, b, data, buffers="keep")
    with pytest.raises(ValueError, match="ts="):
        interpolate(model, a, b, data, ts=1)
    with pytest.raises(ValueError, match="no BatchNorm"):
        interpolate(model, a, b, data, buffers="reset")
