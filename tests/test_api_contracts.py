"""User-level contracts of the public API: documented names and signatures exist, no function
mutates the caller's model or state dicts, and every random function is seeded and replayable."""
from __future__ import annotations

import inspect

import pytest
import torch

import pyrebasin as prb
from pyrebasin import similarity, stitching
# by module path: once __init__ re-exports the function `repair`, `prb.repair` is no longer the module
from pyrebasin.lmc import barrier, interpolate
from pyrebasin.repair import repair as repair_fn, reset_bn

from ._contracts import assert_model_unchanged, assert_sd_equal, clone_sd, snapshot, state, tiny_data, tiny_mlp

# --- names and signatures (ARCHITECTURE.md "Public API") ---------------------------------------

PUBLIC_NAMES = ["PermutationSpec", "trace_spec", "apply_permutation", "random_permutation", "weight_matching",
                "activation_matching", "interpolate", "barrier", "reset_bn", "repair", "sample_coefficients",
                "evaluate_combinations", "combine_states", "check_spec", "use_backend", "backend", "MatchResult",
                "ste_matching", "sinkhorn_matching", "merge_many", "MergeResult", "loss_plane"]


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_exists(name):
    assert name in prb.__all__ and hasattr(prb, name)


def test_reexports_are_the_module_functions():
    assert prb.interpolate is interpolate and prb.barrier is barrier
    assert prb.repair is repair_fn and prb.reset_bn is reset_bn


def test_zoo_and_data_names():
    for cls in (prb.zoo.MLP, prb.zoo.VGG, prb.zoo.ResNet20):
        assert callable(getattr(cls, "permutation_spec"))
    assert callable(prb.data.mnist1d) and callable(prb.data.digits)
    assert callable(stitching.stitch) and callable(prb.shards.permute_safetensors)


def _params(f):
    return inspect.signature(f).parameters


@pytest.mark.parametrize("f, positional, kwonly", [
    (prb.apply_permutation, ["spec", "perms", "state_dict"], {}),
    (prb.random_permutation, ["spec", "state_dict", "generator"], {}),
    (prb.weight_matching, ["spec", "state_a", "state_b"], {"max_iter": 100, "seed": 0, "init": None}),
    (prb.activation_matching, ["model_a", "model_b", "spec", "data"], {}),
    (interpolate, ["model", "state_a", "state_b", "data", "ts"], {}),
    (barrier, ["curve", "metric", "kind"], {}),
    (prb.sample_coefficients, ["spec_or_state", "n", "distribution", "granularity", "seed"], {}),
    (prb.evaluate_combinations, ["model", "state_a", "state_b", "coefficients", "data"], {}),
    (prb.trace_spec, ["model", "example_inputs"], {}),
    (prb.ste_matching, ["model", "spec", "state_a", "state_b", "data"], {}),       # issue 15's API
    (prb.sinkhorn_matching, ["model", "spec", "state_a", "state_b", "data"], {}),
    (prb.merge_many, ["spec", "states"], {}),
])
def test_documented_signature(f, positional, kwonly):
    ps = _params(f)
    pos = [n for n, p in ps.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert pos[:len(positional)] == positional
    for name, default in kwonly.items():
        assert ps[name].kind is inspect.Parameter.KEYWORD_ONLY, f"{name} should be keyword-only"
        assert ps[name].default == default


def test_documented_defaults():
    assert _params(interpolate)["ts"].default == 25
    assert _params(barrier)["metric"].default == "loss"
    assert _params(barrier)["kind"].default == "endpoint_mean"
    assert _params(prb.sample_coefficients)["seed"].default == 0
    assert _params(prb.random_permutation)["generator"].default is None
    fields = {f for f in prb.MatchResult.__dataclass_fields__}
    assert {"perms", "objective", "iterations"} <= fields


# --- no mutation of the caller's model or state dicts ----------------------------------------

@pytest.fixture
def pair():
    a, b = tiny_mlp(0), tiny_mlp(1)
    a.train(), b.train()  # train mode: a forward that forgets eval() would update the BN buffers
    for m in (a, b):  # a user's own hook must survive (the snapshot counts hooks)
        m.layers[0].register_forward_hook(lambda *args: None)
    return a, b


def _mixed(seed):
    """Train mode with one frozen (eval) BatchNorm: restoring with model.train(flag) would clobber it."""
    m = tiny_mlp(seed).train()
    m.norms[0].eval()
    return m


@pytest.mark.parametrize("fn", [
    lambda a, b, x, y: interpolate(a, state(a), state(b), (x, y), ts=3, repair=True),
    lambda a, b, x, y: reset_bn(a, state(a), x),
    lambda a, b, x, y: prb.evaluate_combinations(a, state(a), state(b), prb.sample_coefficients(state(a), 2), (x, y)),
    lambda a, b, x, y: prb.check_spec(a, a.permutation_spec(), (x[:4],)),
    lambda a, b, x, y: prb.trace_spec(a, (x[:4],)),
    lambda a, b, x, y: stitching.stitch(a, b, "layers.0", data=(x, y))(x),
], ids=["interpolate_repair", "reset_bn", "evaluate_combinations", "check_spec", "trace_spec", "stitch"])
def test_mixed_training_flags_restored(fn):
    a, b = _mixed(0), _mixed(1)
    sa, sb = snapshot(a), snapshot(b)
    fn(a, b, *tiny_data())
    assert_model_unchanged(a, sa), assert_model_unchanged(b, sb)


def test_apply_and_random_permutation_leave_inputs(pair):
    a, _ = pair
    spec, sd = a.permutation_spec(), state(a)
    before = clone_sd(sd)
    perms = prb.random_permutation(spec, sd, generator=3)
    perms_before = clone_sd(perms)
    out = prb.apply_permutation(spec, perms, sd)
    assert_sd_equal(before, sd)
    assert_sd_equal(perms_before, perms)
    for k in sd:  # the result never aliases the input
        assert out[k].data_ptr() != sd[k].data_ptr() or sd[k].numel() == 0, k


def test_weight_matching_leaves_inputs(pair):
    a, b = pair
    spec, sa, sb = a.permutation_spec(), state(a), state(b)
    ca, cb = clone_sd(sa), clone_sd(sb)
    init = prb.random_permutation(spec, sa, generator=1)
    ci = clone_sd(init)
    prb.weight_matching(spec, sa, sb, init=init, max_iter=3)
    assert_sd_equal(ca, sa), assert_sd_equal(cb, sb), assert_sd_equal(ci, init)


def test_activation_matching_leaves_models(pair):
    a, b = pair
    a.eval(), b.eval()
    sa, sb = snapshot(a), snapshot(b)
    prb.activation_matching(a, b, a.permutation_spec(), tiny_data()[0], max_iter=3)
    assert_model_unchanged(a, sa), assert_model_unchanged(b, sb)


def test_activation_matching_train_mode_is_evaluated_untouched(pair):
    # train-mode models are evaluated in eval mode on private views (they used to be refused)
    a, b = pair
    sa, sb = snapshot(a), snapshot(b)
    prb.activation_matching(a, b, a.permutation_spec(), tiny_data()[0])
    assert_model_unchanged(a, sa), assert_model_unchanged(b, sb)


def test_interpolate_and_barrier_leave_inputs(pair):
    a, b = pair
    snap, sa, sb = snapshot(a), state(a), state(b)
    ca, cb = clone_sd(sa), clone_sd(sb)
    curve = interpolate(a, sa, sb, tiny_data(), ts=3, buffers="reset")
    assert_model_unchanged(a, snap)
    assert_sd_equal(ca, sa), assert_sd_equal(cb, sb)
    ts_before = list(curve.ts)
    barrier(curve, kind="any_chord")
    assert list(curve.ts) == ts_before


def test_reset_bn_and_repair_leave_inputs(pair):
    a, b = pair
    snap, sa, sb = snapshot(a), state(a), state(b)
    ca, cb = clone_sd(sa), clone_sd(sb)
    x = tiny_data()[0]
    out = reset_bn(a, sa, x)
    assert not torch.equal(out["norms.0.running_mean"], sa["norms.0.running_mean"])  # it did reset
    repair_fn(a, sa, sb, 0.5, x)
    assert_model_unchanged(a, snap)
    assert_sd_equal(ca, sa), assert_sd_equal(cb, sb)


def test_combinations_leave_inputs(pair):
    a, b = pair
    snap, sa, sb = snapshot(a), state(a), state(b)
    ca, cb = clone_sd(sa), clone_sd(sb)
    coef = prb.sample_coefficients(sa, 4, "uniform", seed=1)
    prb.combine_states(sa, sb, coef, 0, 2)
    prb.evaluate_combinations(a, sa, sb, coef, tiny_data(), chunk=2)
    assert_model_unchanged(a, snap)
    assert_sd_equal(ca, sa), assert_sd_equal(cb, sb)


def test_trace_and_check_spec_leave_model(pair):
    a, _ = pair
    snap = snapshot(a)
    spec = prb.trace_spec(a, (tiny_data()[0][:4],))
    prb.check_spec(a, spec, (tiny_data()[0][:4],))
    assert_model_unchanged(a, snap)


def test_stitch_leaves_models(pair):
    a, b = pair
    a.eval()  # a mix of modes: each model's own flags must come back as they were
    sa, sb = snapshot(a), snapshot(b)
    st = stitching.stitch(a, b, "layers.0", data=tiny_data(), kind="affine", init="least_squares")
    st(tiny_data()[0])
    assert_model_unchanged(a, sa), assert_model_unchanged(b, sb)


def test_similarity_leaves_inputs(pair):
    a, b = pair
    sa, sb = state(a), state(b)
    ca, cb = clone_sd(sa), clone_sd(sb)
    similarity.weight_l2(sa, sb), similarity.weight_cosine(sa, sb)
    x, y = torch.randn(20, 5), torch.randn(20, 4)
    cx, cy = x.clone(), y.clone()
    similarity.linear_cka(x, y), similarity.cca_similarity(x, y), similarity.linear_r2(x, y)
    similarity.disagreement(x, x + 0.1), similarity.js_divergence(x, x.flip(0))
    assert_sd_equal(ca, sa), assert_sd_equal(cb, sb)
    assert torch.equal(cx, x) and torch.equal(cy, y)


# --- determinism: same seed, same result ------------------------------------------------------

def test_random_permutation_seeded(pair):
    a, _ = pair
    spec, sd = a.permutation_spec(), state(a)
    p1 = prb.random_permutation(spec, sd, generator=5)
    p2 = prb.random_permutation(spec, sd, generator=torch.Generator().manual_seed(5))
    p3 = prb.random_permutation(spec, sd, generator=6)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert any(not torch.equal(p1[k], p3[k]) for k in p1)


def test_sample_coefficients_seeded(pair):
    sd = state(pair[0])
    for dist in ("uniform", "bernoulli(0.5)", "beta(2, 2)", "gaussian(0.5, 0.2, clip)"):
        v1 = prb.sample_coefficients(sd, 3, dist, seed=4).values()
        v2 = prb.sample_coefficients(sd, 3, dist, seed=4).values()
        v3 = prb.sample_coefficients(sd, 3, dist, seed=5).values()
        assert torch.equal(v1, v2), dist
        assert not torch.equal(v1, v3), dist


def test_weight_matching_seeded():
    a, b = tiny_mlp(0, norm=None), tiny_mlp(1, norm=None)
    spec, sa, sb = a.permutation_spec(), state(a), state(b)
    r1 = prb.weight_matching(spec, sa, sb, seed=3)
    r2 = prb.weight_matching(spec, sa, sb, seed=3)
    assert all(torch.equal(r1.perms[k], r2.perms[k]) for k in r1.perms)
    assert r1.objective == r2.objective


def test_check_spec_and_stitch_seeded(pair):
    a, b = pair
    a.eval(), b.eval()
    x = (tiny_data()[0][:4],)
    spec = a.permutation_spec()
    r1, r2 = prb.check_spec(a, spec, x, seed=2), prb.check_spec(a, spec, x, seed=2)
    assert r1.max_abs_diff == r2.max_abs_diff
    s1 = stitching.stitch(a, b, "layers.0", data=tiny_data(), init="random", seed=9)
    s2 = stitching.stitch(a, b, "layers.0", data=tiny_data(), init="random", seed=9)
    s3 = stitching.stitch(a, b, "layers.0", data=tiny_data(), init="random", seed=10)
    x0 = tiny_data()[0]
    assert torch.equal(s1(x0), s2(x0))
    assert not torch.equal(s1(x0), s3(x0))


def test_evaluate_combinations_replayable(pair):
    a, b = pair
    sa, sb = state(a), state(b)
    coef = prb.sample_coefficients(sa, 4, "uniform", seed=1)
    r1 = prb.evaluate_combinations(a, sa, sb, coef, tiny_data(), chunk=3)
    r2 = prb.evaluate_combinations(a, sa, sb, prb.sample_coefficients(sa, 4, "uniform", seed=1), tiny_data(), chunk=2)
    assert torch.allclose(r1.loss, r2.loss, atol=1e-6) and torch.equal(r1.accuracy, r2.accuracy)
