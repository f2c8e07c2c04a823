// Plain-C description of pyrebasin::combine_batched (CPU and CUDA) and the element loop both run:
// out[k][e] = b[e] + lambda_k(i(e)) * (a[e] - b[e]), with i(e) = base + (e / div) % mod the
// coefficient index of flat element e (element, neuron, layer and global granularity are all of
// this form) and lambda drawn from (seed, sample_begin + k, i) by the counter-based RNG.
#pragma once
#include <cstdint>

#include "pyrebasin/common.h"
#include "pyrebasin/philox.h"

namespace pyrebasin {

// Consecutive elements one CUDA thread writes (the binding sizes its span offsets with it).
constexpr int64_t kCombineSpan = 4;

struct CombineTensorDesc {
  const void* a;    // contiguous, numel elements
  const void* b;    // contiguous, same shape and dtype as a
  void* out;        // contiguous [num_samples, numel]
  int64_t numel;
  int64_t coef_base;
  int64_t coef_div;  // >= 1
  int64_t coef_mod;  // >= 1
  DType dtype;
};

struct CombineParams {
  int32_t dist;       // rng::Distribution
  double params[4];
  uint64_t seed;
  int64_t sample_begin;
};

// Elements [e0, e1) of sample k (0-based within the call). Arithmetic runs in opmath_t (float for
// 16/32-bit types, double for float64) with every operation rounded once, as the reference does.
template <typename scalar_t, typename opmath_t>
PRB_HD void combine_span(const CombineTensorDesc& d, const CombineParams& p, int64_t k, int64_t e0,
                         int64_t e1) {
  const scalar_t* a = static_cast<const scalar_t*>(d.a);
  const scalar_t* b = static_cast<const scalar_t*>(d.b);
  scalar_t* out = static_cast<scalar_t*>(d.out) + k * d.numel;
  const uint32_t sample = static_cast<uint32_t>(p.sample_begin + k);
  if (d.coef_div == 1 && p.dist != rng::kConstant && p.dist != rng::kBeta) {
    // Element granularity: one Philox call serves `lanes` consecutive coefficients, no cache.
    const int64_t shift = rng::lanes(p.dist) == 4 ? 2 : 1;
    int64_t q = e0 % d.coef_mod;
    int64_t e = e0;
    while (e < e1) {
      const int64_t idx = d.coef_base + q;
      const int64_t blk = idx >> shift;
      const int64_t lane0 = idx - (blk << shift);
      int64_t cnt = (int64_t{1} << shift) - lane0;
      cnt = cnt < e1 - e ? cnt : e1 - e;
      cnt = cnt < d.coef_mod - q ? cnt : d.coef_mod - q;
      const rng::U32x4 w = rng::draw(p.seed, sample, static_cast<uint64_t>(blk), 0u);
      for (int64_t j = 0; j < cnt; ++j) {
        const opmath_t lam = static_cast<opmath_t>(
            rng::lane_coefficient(p.dist, p.params, w, static_cast<int>(lane0 + j)));
        const opmath_t av = static_cast<opmath_t>(a[e + j]);
        const opmath_t bv = static_cast<opmath_t>(b[e + j]);
        out[e + j] = static_cast<scalar_t>(rng::add(bv, rng::mul(lam, rng::sub(av, bv))));
      }
      e += cnt;
      q += cnt;
      if (q == d.coef_mod) q = 0;
    }
    return;
  }
  rng::CoefficientCache cache;
  int64_t q = e0 / d.coef_div;
  int64_t r = e0 - q * d.coef_div;
  q %= d.coef_mod;
  int64_t e = e0;
  while (e < e1) {
    // A run of elements sharing one coefficient: constant lambda, a vectorisable loop on CPU.
    const int64_t run_end = e + (d.coef_div - r) < e1 ? e + (d.coef_div - r) : e1;
    const opmath_t lam =
        static_cast<opmath_t>(cache.get(p.dist, p.params, p.seed, sample, d.coef_base + q));
    for (int64_t j = e; j < run_end; ++j) {
      const opmath_t av = static_cast<opmath_t>(a[j]);
      const opmath_t bv = static_cast<opmath_t>(b[j]);
      out[j] = static_cast<scalar_t>(rng::add(bv, rng::mul(lam, rng::sub(av, bv))));
    }
    e = run_end;
    r = 0;
    if (++q == d.coef_mod) q = 0;
  }
}

}  // namespace pyrebasin
