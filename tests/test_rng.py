"""pyrebasin.rng: Philox known-answer vectors, the correctly rounded math, distribution moments."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pyrebasin import rng


@pytest.mark.parametrize("ctr,key,want", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, want):
    # Random123's kat_vectors for philox4x32_10.
    got = rng.philox4x32_10(*ctr, *key)
    assert tuple(int(w) for w in got) == want


def test_math_accuracy():
    x = torch.cat([torch.rand(20000, dtype=torch.float64), torch.logspace(-300, 300, 2001, dtype=torch.float64)])
    torch.testing.assert_close(rng.log_rn(x), torch.from_numpy(np.log(x.numpy())), rtol=1e-15, atol=1e-300)
    y = torch.linspace(-690, 690, 20001, dtype=torch.float64)
    torch.testing.assert_close(rng.exp_rn(y), torch.from_numpy(np.exp(y.numpy())), rtol=1e-13, atol=0)
    p = torch.cat([torch.rand(20000, dtype=torch.float64), torch.tensor([1e-300, 1e-12, 0.02, 0.975, 1 - 1e-12],
                                                                          dtype=torch.float64)])
    want = torch.from_numpy(norm.ppf(p.numpy()))
    assert float(((rng.normal_quantile(p) - want).abs() / (1 + want.abs())).max()) < 1e-14


def _draws(dist, params, n=40000, seed=7):
    return rng.coefficients(dist, params, seed, torch.arange(4)[:, None], torch.arange(n // 4)[None, :]).flatten()


@pytest.mark.parametrize("dist,params,mean,var", [
    ("uniform", (0, 1), 0.5, 1 / 12),
    ("uniform", (-0.5, 1.5), 0.5, 4 / 12),
    ("bernoulli", (0.3,), 0.3, 0.21),
    ("gaussian", (0.5, 0.2, -math.inf, math.inf), 0.5, 0.04),
    ("beta", (2.0, 3.0), 0.4, 6 / (25 * 6)),
    ("beta", (0.5, 0.5), 0.5, 0.125),
    ("beta", (0.2, 1.5), 0.2 / 1.7, 0.2 * 1.5 / (1.7 ** 2 * 2.7)),
    ("constant", (0.25,), 0.25, 0.0),
])
def test_distribution_moments(dist, params, mean, var):
    x = _draws(dist, params)
    se = math.sqrt(var / len(x)) + 1e-12
    assert abs(float(x.mean()) - mean) < 5 * se
    assert abs(float(x.var()) - var) < 0.05 * var + 1e-12
    if dist == "beta":
        assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_gaussian_clip_and_ranges():
    x = _draws("gaussian", (0.5, 1.0, 0.0, 1.0))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    u = _draws("uniform", (-0.25, 1.25))
    assert -0.25 <= float(u.min()) < -0.2 and 1.2 < float(u.max()) <= 1.25


def test_neighbouring_lanes_and_samples_independent():
    lam = rng.coefficients("uniform", (0, 1), 3, torch.arange(2)[:, None], torch.arange(40000)[None, :])
    c_lane = np.corrcoef(lam[0, :-1].numpy(), lam[0, 1:].numpy())[0, 1]
    c_sample = np.corrcoef(lam[0].numpy(), lam[1].numpy())[0, 1]
    assert abs(c_lane) < 0.03 and abs(c_sample) < 0.03


def test_replayable_pure_function_of_seed_sample_index():
    full = rng.coefficients("beta", (0.7, 1.3), 11, torch.arange(5)[:, None], torch.arange(33)[None, :])
    alone = rng.coefficients("beta", (0.7, 1.3), 11, torch.tensor([3]), torch.tensor([17]))
    assert torch.equal(full[3, 17:18], alone)
    other = rng.coefficients("beta", (0.7, 1.3), 12, torch.arange(5)[:, None], torch.arange(33)[None, :])
    assert not torch.equal(full, other)


def test_unknown_distribution():
    with pytest.raises(ValueError, match="unknown distribution"):
        rng.coefficients("cauchy", (0, 1), 0, torch.arange(2), torch.arange(2))


# The batched CPU Philox of csrc/include/pyrebasin/philox_batch.h (portable loop and AVX2), compiled
# here against the headers alone: every word must equal philox.h's scalar rng::draw, and rng.draw.
_PHILOX_BATCH_MAIN = r"""
#include <cstdio>
#include "pyrebasin/philox_batch.h"
using namespace pyrebasin::rng;
int main() {
  unsigned long long seed, blk0;
  unsigned sample;
  uint32_t w[4 * kBatchBlocks];
  while (std::scanf("%llu %u %llu", &seed, &sample, &blk0) == 3) {
    for (int j = 0; j < kBatchBlocks; ++j) {  // scalar reference
      const U32x4 r = draw(seed, sample, blk0 + j, 0u);
      for (int l = 0; l < 4; ++l) std::printf("%u ", r.v[l]);
    }
    philox_batch_portable(seed, sample, blk0, w);
    for (uint32_t x : w) std::printf("%u ", x);
#ifdef PRB_HAVE_AVX2_PHILOX
    if (cpu_has_avx2() && static_cast<uint32_t>(blk0) <= UINT32_MAX - kBatchBlocks) {
      philox_batch_avx2(seed, sample, blk0, w);
    }  // else: the portable words again (philox_batch's own fallback)
#endif
    for (uint32_t x : w) std::printf("%u ", x);
    philox_batch(seed, sample, blk0, w);
    for (uint32_t x : w) std::printf("%u ", x);
    std::printf("\n");
  }
}
"""


@pytest.fixture(scope="module")
def philox_batch_binary(tmp_path_factory):
    import os
    import shutil
    import subprocess

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tmp_path_factory.mktemp("philox_batch")
    (d / "main.cpp").write_text(_PHILOX_BATCH_MAIN)
    # The extension's flags: -O3 (the loops vectorise) and no FMA contraction.
    subprocess.run([cxx, "-std=c++17", "-O3", "-ffp-contract=off", "-I", os.path.join(root, "csrc", "include"),
                    str(d / "main.cpp"), "-o", str(d / "main")], check=True)
    return str(d / "main")


def test_batched_cpu_philox_equals_scalar_and_reference(philox_batch_binary):
    import subprocess

    cases = [(0, 0, 0), (7, 3, 5), (2**64 - 1, 2**32 - 1, 2**40 + 17), (0x243F6A8885A308D3, 11, 2**32 - 32),
             (12345, 1, 2**32 - 31),  # carries across 2^32 inside the batch: the portable path
             (2**63, 4, 2**33 - 5)]
    stdin = "".join(f"{s} {k} {b}\n" for s, k, b in cases)
    out = subprocess.run([philox_batch_binary], input=stdin, capture_output=True, text=True, check=True).stdout
    n = 4 * 32
    for (seed, sample, blk0), line in zip(cases, out.splitlines(), strict=True):
        words = [int(w) for w in line.split()]
        scalar, portable, avx2, dispatched = (words[i * n:(i + 1) * n] for i in range(4))
        assert portable == scalar and avx2 == scalar and dispatched == scalar, (seed, sample, blk0)
        blocks = torch.tensor([blk0 + j for j in range(32)], dtype=torch.int64)
        ref = torch.stack(rng.draw(seed, torch.tensor(sample), blocks, 0), dim=-1).flatten().tolist()
        assert ref == scalar, (seed, sample, blk0)
