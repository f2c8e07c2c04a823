"""CUDA twin of test_combine_batched: the CUDA kernel draws the same λ and writes the same
combinations as the reference (and the CPU kernel), bit for bit."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin import reference
from pyrebasin._backend import has_kernel

from ..test_combine_batched import DISTS, sample_inputs

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not has_kernel("combine_batched", "cuda"), reason="CUDA kernel not built")]


@pytest.mark.parametrize("dist,params", DISTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference_bitwise(dist, params, dtype):
    a, b, layouts = sample_inputs(dtype=dtype)
    for base, div, mod in layouts:
        out = torch.ops.pyrebasin.combine_batched([x.cuda() for x in a], [y.cuda() for y in b], base, div, mod,
                                                  dist, params, -77, 2**31, 5)
        ref = reference.combine_batched(a, b, base, div, mod, dist, params, -77, 2**31, 5)
        for o, r in zip(out, ref):
            assert o.is_cuda and torch.equal(o.cpu(), r)


@pytest.mark.parametrize("dist,params", DISTS)
def test_cuda_lambda_equals_cpu_lambda(dist, params):
    n = 1 << 16
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    cpu = torch.ops.pyrebasin.combine_batched([one], [zero], [7], [1], [n], dist, params, 3, 0, 4)[0]
    gpu = torch.ops.pyrebasin.combine_batched([one.cuda()], [zero.cuda()], [7], [1], [n], dist, params, 3, 0, 4)[0]
    assert torch.equal(gpu.cpu(), cpu)


def test_cuda_evaluate_combinations_matches_cpu():
    torch.manual_seed(0)
    m = prb.zoo.MLP(40, 64, 2)
    a = m.state_dict()
    b = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in a.items()}
    x, y = torch.randn(100, 40), torch.randint(0, 10, (100,))
    c = prb.sample_coefficients(m.permutation_spec(), 9, "uniform", "neuron", seed=1, state=a)
    cpu = prb.evaluate_combinations(m, a, b, c, (x, y), chunk=4)
    gm = prb.zoo.MLP(40, 64, 2).cuda()
    gpu = prb.evaluate_combinations(gm, {k: v.cuda() for k, v in a.items()}, {k: v.cuda() for k, v in b.items()},
                                    c, (x, y), chunk=4)
    torch.testing.assert_close(gpu.loss, cpu.loss, rtol=1e-4, atol=1e-4)
    assert gpu.peak_memory_bytes is not None and gpu.peak_memory_bytes > 0


def test_cuda_opcheck():
    a, b, layouts = sample_inputs(device="cuda", dtype=torch.float32)
    torch.library.opcheck(torch.ops.pyrebasin.combine_batched,
                          (a, b, *layouts[1], "beta", [0.5, 2.0], 3, 2, 4))
