"""CUDA twin of tests/test_corr_accumulate.py: the CUDA kernel against the reference and corrcoef."""
import pytest
import torch

from pyrebasin import reference
from pyrebasin._backend import has_kernel
from pyrebasin.moments import CrossMoments

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("corr_accumulate", "cuda")),
    reason="needs CUDA and the CUDA corr_accumulate kernel")]

from tests.test_corr_accumulate import CASES, accumulators, ref_corr  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("self_stream", [False, True])
def test_cuda_equals_reference(case, self_stream):
    _, x, y, cd = case
    y = None if self_stream else y
    cy = (x if y is None else y).shape[cd]
    nat = accumulators(x.shape[cd], cy, "cuda")
    ref = accumulators(x.shape[cd], cy)
    for _ in range(2):
        torch.ops.pyrebasin.corr_accumulate(x.cuda(), None if y is None else y.cuda(), cd, *nat)
        reference.corr_accumulate(x, y, cd, *ref)
    for a, b in zip(nat, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("case", CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_cuda_opcheck(case):
    _, x, y, cd = case
    torch.library.opcheck(torch.ops.pyrebasin.corr_accumulate,
                          (x.cuda(), y.cuda(), cd, *accumulators(x.shape[cd], y.shape[cd], "cuda")))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_streamed_corr(case):
    _, x, y, cd = case
    m = CrossMoments(x.shape[cd], y.shape[cd], device="cuda")
    for xb, yb in zip(x.cuda().split(2), y.cuda().split(2)):
        m.update(xb, yb, channel_dim=cd)
    torch.testing.assert_close(m.corr().cpu(), ref_corr(x, y, cd), rtol=1e-6, atol=1e-9)


def test_cuda_large_chunked():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 512, 7, generator=g)
    y = torch.randn(3000, 256, 7, generator=g)
    nat = accumulators(512, 256, "cuda")
    ref = accumulators(512, 256)
    torch.ops.pyrebasin.corr_accumulate(x.cuda(), y.cuda(), 1, *nat)
    reference.corr_accumulate(x, y, 1, *ref)
    for a, b in zip(nat, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-11, atol=1e-7)
