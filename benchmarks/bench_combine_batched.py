"""pytest-benchmark suite for the combination op: `pytest benchmarks/bench_combine_batched.py --benchmark-enable`.

Groups compare the native op, the reference and a plain torch expression (λ materialised by torch.rand)
on an MLP 3x512 state dict, 16 combinations, per granularity.
"""
import pytest
import torch

import pyrebasin as prb


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    m = prb.zoo.MLP(40, 512, 3)
    a = m.state_dict()
    b = {k: torch.randn_like(v) for k, v in a.items()}
    return m.permutation_spec(), a, b


@pytest.mark.parametrize("granularity", ["element", "neuron", "global"])
@pytest.mark.parametrize("impl", ["native", "reference", "torch_rand_expr"])
def test_combine_states(benchmark, pair, granularity, impl):
    spec, a, b = pair
    benchmark.group = f"combine 16 x MLP3x512 [{granularity}]"
    if impl == "torch_rand_expr":
        g = torch.Generator().manual_seed(0)
        benchmark(lambda: {k: b[k] + torch.rand((16, *a[k].shape), generator=g) * (a[k] - b[k]) for k in a})
        return
    if impl == "native" and not prb.native_available():
        pytest.skip("native extension not built")
    c = prb.sample_coefficients(spec, 16, "uniform", granularity, seed=0, state=a)
    with prb.use_backend(impl):
        benchmark(prb.combine_states, a, b, c)
