"""pytest-benchmark suite for apply_permutation: `pytest benchmarks/bench_permute_multi.py --benchmark-enable`.

Groups compare native, reference and the clone() floor on the same state dict.
"""
import pytest

import pyrebasin as prb

from .permute_ratios import resnet20x8, transformer_block

CASES = {"resnet20x8_bn": resnet20x8, "transformer_block": lambda: transformer_block(2048, 5504, 16)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    spec, state = CASES[request.param]()
    return request.param, spec, state, prb.random_permutation(spec, state, 0)


@pytest.mark.parametrize("impl", ["clone", "native", "reference"])
def test_apply_permutation(benchmark, case, impl):
    name, spec, state, perms = case
    benchmark.group = f"apply_permutation[{name}]"
    if impl == "clone":
        benchmark(lambda: {k: v.clone() for k, v in state.items()})
    else:
        if impl == "native" and not prb.native_available():
            pytest.skip("native extension not built")
        with prb.use_backend(impl):
            benchmark(prb.apply_permutation, spec, perms, state)
