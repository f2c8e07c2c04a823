"""corr_accumulate (native) against its reference twin and against concatenate + torch.corrcoef."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin import ops, reference
from pyrebasin._backend import has_kernel
from pyrebasin.moments import CrossMoments

NATIVE = has_kernel("corr_accumulate", "cpu")
needs_native = pytest.mark.skipif(not NATIVE, reason="native corr_accumulate not built")


def ref_corr(x, y, channel_dim):
    """The oracle: all samples concatenated, channel last, torch.corrcoef in float64; dead -> 0."""
    xs = x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).double()
    ys = y.movedim(channel_dim, -1).reshape(-1, y.shape[channel_dim]).double()
    c = torch.corrcoef(torch.cat([xs, ys], 1).T)[: xs.shape[1], xs.shape[1]:]
    return torch.nan_to_num(c, nan=0.0)


def accumulators(cx, cy, device="cpu"):
    f64 = dict(dtype=torch.float64, device=device)
    return [torch.zeros((), **f64), torch.zeros(cx, **f64), torch.zeros(cy, **f64),
            torch.zeros(cx, **f64), torch.zeros(cy, **f64), torch.zeros(cx, cy, **f64)]


def sample_inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)

    dead = r(50, 7)
    dead[:, 3] = 1.25  # a dead unit (zero variance)
    yield "dense", r(33, 5), r(33, 9), -1
    yield "dense_dead", dead, r(50, 4), -1
    yield "n1", r(17, 1), r(17, 1), 1
    yield "tokens", r(4, 6, 8), r(4, 6, 3), -1
    yield "conv1d", r(5, 6, 11), r(5, 4, 11), 1
    yield "conv2d", r(3, 5, 4, 6), r(3, 7, 4, 6), 1
    yield "noncontig_rows", r(9, 40)[:, ::3], r(40, 9).T, 1
    yield "noncontig_conv", r(6, 7, 10).transpose(0, 2), r(10, 6, 4).transpose(1, 2), 1
    yield "float64", r(21, 6, dtype=torch.float64), r(21, 5, dtype=torch.float64), -1
    yield "bfloat16", r(21, 6, dtype=torch.bfloat16), r(21, 5, dtype=torch.float16), -1
    yield "mixed_dtypes_conv", r(4, 3, 5, dtype=torch.bfloat16), r(4, 2, 5, dtype=torch.float64), 1


CASES = list(sample_inputs())


@needs_native
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("self_stream", [False, True])
def test_native_equals_reference(case, self_stream):
    _, x, y, cd = case
    if self_stream:
        y = None
    cy = (x if y is None else y).shape[cd]
    nat, ref = accumulators(x.shape[cd], cy), accumulators(x.shape[cd], cy)
    for _ in range(2):  # accumulating twice checks the in-place adds
        torch.ops.pyrebasin.corr_accumulate(x, y, cd, *nat)
        reference.corr_accumulate(x, y, cd, *ref)
    for a, b in zip(nat, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


@needs_native
@pytest.mark.parametrize("case", CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_opcheck(case):
    _, x, y, cd = case
    torch.library.opcheck(torch.ops.pyrebasin.corr_accumulate,
                          (x, y, cd, *accumulators(x.shape[cd], y.shape[cd])))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_streamed_corr_equals_corrcoef(case, backend):
    if backend == "native" and not NATIVE:
        pytest.skip("native corr_accumulate not built")
    _, x, y, cd = case
    m = CrossMoments(x.shape[cd], y.shape[cd])
    with prb.use_backend(backend):
        for xb, yb in zip(x.split(2), y.split(2)):  # stream in batches
            m.update(xb, yb, channel_dim=cd)
    expected = ref_corr(x, y, cd)
    torch.testing.assert_close(m.corr(), expected, rtol=1e-6, atol=1e-9)
    assert not m.corr().isnan().any()


@needs_native
def test_chunk_boundaries_inside_conv_rows():
    # 1024 channels -> 2048-sample chunks; 900 x 3 positions cross a chunk edge mid outer-row.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(900, 1024, 3, generator=g)
    y = torch.randn(900, 1024, 3, generator=g) + x
    nat, ref = accumulators(1024, 1024), accumulators(1024, 1024)
    torch.ops.pyrebasin.corr_accumulate(x, y, 1, *nat)
    reference.corr_accumulate(x, y, 1, *ref)
    for a, b in zip(nat, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-8)


@needs_native
def test_errors_name_the_tensor():
    x = torch.randn(8, 4)
    acc = accumulators(4, 3)
    with pytest.raises(RuntimeError, match="agree on every dim"):
        torch.ops.pyrebasin.corr_accumulate(x, torch.randn(7, 3), -1, *acc)
    with pytest.raises(RuntimeError, match="sum_y must have shape \\[5\\]"):
        torch.ops.pyrebasin.corr_accumulate(x, torch.randn(8, 5), -1, *acc)
    with pytest.raises(RuntimeError, match="channel_dim 2 is out of range"):
        torch.ops.pyrebasin.corr_accumulate(x, None, 2, *accumulators(4, 4))
    with pytest.raises(RuntimeError, match="x must have dtype float32"):
        torch.ops.pyrebasin.corr_accumulate(x.long(), None, -1, *accumulators(4, 4))
    bad = accumulators(4, 4)
    bad[5] = bad[5].float()
    with pytest.raises(RuntimeError, match="sum_xy must be a float64"):
        torch.ops.pyrebasin.corr_accumulate(x, None, -1, *bad)


def test_crossmoments_api_unchanged():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, generator=g)
    m = CrossMoments(6, device="cpu").update(x, channel_dim=1)
    assert m.count.item() == 10 and m.sum_xy.shape == (6, 6)
    torch.testing.assert_close(m.sum_xy, m.sum_xy.T)
    torch.testing.assert_close(m.mean_x, x.movedim(1, -1).reshape(-1, 6).double().mean(0))
    torch.testing.assert_close(m.corr().diagonal(), torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="features"):
        m.update(torch.randn(3, 7))
    with pytest.raises(ValueError, match="no samples"):
        CrossMoments(3).corr()
    ops.corr_accumulate(x, None, 1, m.count, m.sum_x, m.sum_y, m.sum_xx, m.sum_yy, m.sum_xy)
    assert m.count.item() == 20
