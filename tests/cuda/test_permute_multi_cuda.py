"""CUDA twin of test_permute_multi: the CUDA kernel equals the reference bit-for-bit."""
import pytest
import torch

from pyrebasin import reference
from pyrebasin._backend import has_kernel

from ..test_permute_multi import _assert_bitwise, sample_inputs

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not has_kernel("permute_multi", "cuda"), reason="CUDA kernel not built")]


@pytest.mark.parametrize("seed", range(50))
def test_cuda_matches_reference_bitwise(seed):
    tensors, indices, owners, axes = sample_inputs(seed, n_tensors=5)
    dev = [t.cuda() for t in tensors], [i.cuda() for i in indices]
    out = torch.ops.pyrebasin.permute_multi(dev[0], dev[1], owners, axes)
    _assert_bitwise([o.cpu() for o in out], reference.permute_multi(tensors, indices, owners, axes))


def test_cuda_large_state_dict():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1024, 4096, generator=g), torch.randn(4096, generator=g)]
    idx = [torch.randperm(1024, generator=g), torch.randperm(4096, generator=g), torch.randperm(4096, generator=g)]
    out = torch.ops.pyrebasin.permute_multi([x.cuda() for x in xs], [i.cuda() for i in idx], [0, 0, 1], [0, 1, 0])
    ref = reference.permute_multi(xs, idx, [0, 0, 1], [0, 1, 0])
    _assert_bitwise([o.cpu() for o in out], ref)


@pytest.mark.parametrize("rank", [0, 1, 8, 9])
def test_cuda_every_rank_fixed_or_permuted(rank):
    # Twin of test_every_rank_fixed_or_permuted_matches_reference: coalesced views and the staged
    # gather past 8 dims (all 9 axes permuted, transposed source).
    g = torch.Generator().manual_seed(rank)
    x = torch.randn([(2, 3, 1)[a % 3] for a in range(rank)], generator=g)
    if rank >= 2:
        x = x.transpose(0, -1)
    for axes in [[]] + ([[rank - 1], list(range(rank))] if rank else []):
        indices = [torch.randperm(x.shape[a], generator=g) for a in axes]
        out = torch.ops.pyrebasin.permute_multi([x.cuda()], [i.cuda() for i in indices], [0] * len(axes), axes)
        _assert_bitwise([o.cpu() for o in out], reference.permute_multi([x], indices, [0] * len(axes), axes))
