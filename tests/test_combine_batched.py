"""combine_batched: native kernel == pure-PyTorch reference bit for bit (λ and combinations), opcheck,
and caller errors."""
import math

import pytest
import torch

import pyrebasin as prb
from pyrebasin import ops, reference

pytestmark = pytest.mark.skipif(not prb.native_available(), reason="native extension not built")

DISTS = [("uniform", [0.0, 1.0]), ("uniform", [-0.5, 1.5]), ("bernoulli", [0.5]), ("bernoulli", [0.1]),
         ("gaussian", [0.5, 0.3, -math.inf, math.inf]), ("gaussian", [0.5, 2.0, 0.0, 1.0]),
         ("beta", [0.3, 0.6]), ("beta", [2.0, 5.0]), ("constant", [0.25]), ("constant", [-1.5])]


def sample_inputs(device="cpu", dtype=torch.float32, seed=0):
    """Odd sizes, a scalar, an empty tensor, a non-contiguous view, element/neuron/layer/global maps."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4, 5), (), (0, 3), (1,)]
    a = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    b = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    a.append(torch.randn(6, 9, generator=g).to(device, dtype).t())           # non-contiguous
    b.append(torch.randn(9, 6, generator=g).to(device, dtype))
    numels = [max(1, math.prod(x.shape)) for x in a]
    element = ([sum(numels[:i]) for i in range(len(a))], [1] * len(a), numels)
    neuron = ([0, 7, 20, 23, 24, 25, 26], [5, 1, 4, 1, 1, 1, 1], [7, 13, 15, 1, 3, 1, 6])
    layer = (list(range(len(a))), numels, [1] * len(a))
    return a, b, [element, neuron, layer]


@pytest.mark.parametrize("dist,params", DISTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_native_equals_reference_bit_exact(dist, params, dtype):
    a, b, layouts = sample_inputs(dtype=dtype)
    for base, div, mod in layouts:
        for seed, begin, k in [(123, 0, 5), (-77, 2**31, 3), (2**40 + 5, 7, 1)]:
            nat = ops.combine_batched(a, b, base, div, mod, dist, params, seed, begin, k)
            ref = reference.combine_batched(a, b, base, div, mod, dist, params, seed, begin, k)
            for i, (n_, r_) in enumerate(zip(nat, ref)):
                assert n_.shape == (k, *a[i].shape) and n_.dtype == dtype and n_.is_contiguous()
                assert torch.equal(n_, r_), (dist, dtype, i, seed)


@pytest.mark.parametrize("dist,params", DISTS)
def test_native_lambda_is_reference_lambda(dist, params):
    # With a = 1, b = 0 in float64 the combination is λ itself, exactly.
    n = 4099
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    lam = ops.combine_batched([one], [zero], [3], [1], [n], dist, params, 99, 11, 6)[0]
    want = prb.rng.coefficients(dist, params, 99, torch.arange(11, 17)[:, None], torch.arange(3, 3 + n)[None, :])
    assert torch.equal(lam, want)


def test_samples_regenerate_alone():
    a, b, layouts = sample_inputs()
    base, div, mod = layouts[0]
    full = ops.combine_batched(a, b, base, div, mod, "beta", [0.5, 0.5], 5, 0, 8)
    for k in (0, 3, 7):
        alone = ops.combine_batched(a, b, base, div, mod, "beta", [0.5, 0.5], 5, k, 1)
        assert all(torch.equal(f[k:k + 1], s) for f, s in zip(full, alone))


def test_large_tensor_parallel_tasks_and_zero_samples():
    # Several parallel tasks per tensor, with a neuron map whose runs straddle task boundaries.
    a, b = torch.randn(3001, 7), torch.randn(3001, 7)
    for base, div, mod in [(0, 1, 21007), (5, 7, 3001), (0, 3, 11)]:
        nat = ops.combine_batched([a], [b], [base], [div], [mod], "uniform", [0, 1], 1, 0, 3)[0]
        ref = reference.combine_batched([a], [b], [base], [div], [mod], "uniform", [0, 1], 1, 0, 3)[0]
        assert torch.equal(nat, ref)
    out = ops.combine_batched([a], [b], [0], [1], [21007], "uniform", [0, 1], 1, 0, 0)[0]
    assert out.shape == (0, 3001, 7)


def test_inputs_untouched():
    a, b, layouts = sample_inputs()
    a0, b0 = [x.clone() for x in a], [x.clone() for x in b]
    ops.combine_batched(a, b, *layouts[0], "uniform", [0, 1], 0, 0, 2)
    assert all(torch.equal(x, y) for x, y in zip(a + b, a0 + b0))


def test_opcheck():
    a, b, layouts = sample_inputs(dtype=torch.float64)
    for base, div, mod in layouts[:2]:
        torch.library.opcheck(torch.ops.pyrebasin.combine_batched,
                              (a, b, base, div, mod, "gaussian", [0.5, 0.3, 0.0, 1.0], 3, 2, 4))


@pytest.mark.parametrize("impl", [ops.combine_batched, reference.combine_batched])
def test_caller_errors(impl):
    a, b = [torch.randn(3, 4)], [torch.randn(3, 4)]
    ok = dict(coef_base=[0], coef_div=[1], coef_mod=[12], distribution="uniform", params=[0, 1], seed=0,
              sample_begin=0, num_samples=2)
    bad = [
        ({}, dict(b=[torch.randn(4, 3)]), "shape|differ"),
        ({}, dict(b=[torch.randn(3, 4, dtype=torch.float64)]), "(?i)float|dtype|differ"),
        ({"coef_div": [0]}, {}, "div"),
        ({"distribution": "cauchy"}, {}, "distribution"),
        ({"params": [0.5]}, {}, "param"),
        ({"coef_base": [0, 1]}, {}, "same length"),
    ]
    for kw, tensors, match in bad:
        args = {**ok, **kw}
        with pytest.raises((ValueError, RuntimeError), match=match):
            impl(tensors.get("a", a), tensors.get("b", b), **args)
    if impl is ops.combine_batched:
        with pytest.raises(RuntimeError, match="dtype"):
            impl([torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)], **{**ok, "coef_mod": [3]})
        with pytest.raises(RuntimeError, match="beta"):
            impl(a, b, **{**ok, "distribution": "beta", "params": [0.0, 1.0]})
        with pytest.raises(RuntimeError, match="2\\^32"):
            impl(a, b, **{**ok, "sample_begin": 2**32 - 1})


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @settings(max_examples=25, deadline=None)
    @given(shape=st.lists(st.integers(1, 9), min_size=0, max_size=3), div=st.integers(1, 12), mod=st.integers(1, 40),
           base=st.integers(0, 2**40), seed=st.integers(-2**63, 2**63 - 1), begin=st.integers(0, 2**32 - 4),
           k=st.integers(1, 3), dist=st.sampled_from(DISTS))
    def test_property_native_equals_reference(shape, div, mod, base, seed, begin, k, dist):
        g = torch.Generator().manual_seed(len(shape) + div)
        a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        args = ([base], [div], [mod], dist[0], dist[1], seed, begin, k)
        assert torch.equal(ops.combine_batched([a], [b], *args)[0], reference.combine_batched([a], [b], *args)[0])


@pytest.mark.parametrize("dist,params", [("uniform", [-0.5, 1.5]), ("bernoulli", [0.3])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_element_vector_path_batches_and_wraps(dist, params, dtype):
    # The CPU element path draws 128 coefficients per batch from 4-aligned Philox blocks: unaligned
    # bases, periods (mod) shorter than the tensor, and spans crossing task and batch boundaries.
    a, b = torch.randn(3001, 7, dtype=dtype), torch.randn(3001, 7, dtype=dtype)
    for base, mod in [(0, 21007), (5, 333), (3, 130), (2**33 + 1, 21007), (7, 1)]:
        nat = ops.combine_batched([a], [b], [base], [1], [mod], dist, params, 17, 3, 2)[0]
        ref = reference.combine_batched([a], [b], [base], [1], [mod], dist, params, 17, 3, 2)[0]
        assert torch.equal(nat, ref), (base, mod)
