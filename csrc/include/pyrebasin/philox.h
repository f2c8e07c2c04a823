// Counter-based RNG (Philox-4x32-10, Salmon et al. 2011) and the coefficient distributions of mode
// combinability, as __host__ __device__ functions shared by the CPU and CUDA kernels.
//
// Every value is a pure function of (seed, sample k, coefficient index i): any sample can be
// regenerated alone. pyrebasin/rng.py implements the same arithmetic in PyTorch int64/float64 ops,
// and the two agree bit for bit. That is why nothing here calls libm beyond correctly rounded
// operations (+ - * / sqrt, floor, frexp, ldexp): log, exp and the normal quantile are our own
// polynomials, and on CUDA every double operation goes through an explicit _rn intrinsic so that
// nvcc cannot contract a*b+c into an FMA (which rounds once instead of twice).
#pragma once
#include <cmath>
#include <cstdint>

#include "pyrebasin/common.h"

namespace pyrebasin {
namespace rng {

// ---- correctly rounded double arithmetic, identical on host and device ----
PRB_HD double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
PRB_HD double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
PRB_HD double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
PRB_HD double div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
PRB_HD double sqrt_rn(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return ::sqrt(a);
#endif
}

PRB_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PRB_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PRB_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// ---- Philox-4x32-10 ----
struct U32x4 {
  uint32_t v[4];
};

// The multipliers and Weyl key increments of Philox-4x32 (the batched CPU copies use these too).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// One round on counter (c0, c1, c2, c3) with round key (k0, k1).
PRB_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                         uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// Round r's key: the key advanced r times by the Weyl increments.
PRB_HD void philox_bump_key(uint32_t& k0, uint32_t& k1) {
  k0 += kPhiloxW0;
  k1 += kPhiloxW1;
}

// counter = (c0, c1, c2, c3), key = (k0, k1); returns 4 independent uniform 32-bit words.
PRB_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                           uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) philox_bump_key(k0, k1);
    philox_round(c0, c1, c2, c3, k0, k1);
  }
  return U32x4{{c0, c1, c2, c3}};
}

// (seed, sample, 64-bit block, stream word) -> 4 words. The block is the coefficient index divided
// by the number of lanes a distribution draws from one call.
PRB_HD U32x4 draw(uint64_t seed, uint32_t sample, uint64_t block, uint32_t stream) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), sample,
                       stream, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform in (0, 1) from 24 bits (exact in float32 and double).
// r >> 8 < 2^24 converts exactly through int32, which CPU compilers vectorise (combine_batched).
PRB_HD double u24(uint32_t r) {
  return (static_cast<double>(static_cast<int32_t>(r >> 8)) + 0.5) * 5.9604644775390625e-08;
}
// Uniform in (0, 1) from 32 bits.
PRB_HD double u32(uint32_t r) { return (static_cast<double>(r) + 0.5) * 2.3283064365386963e-10; }
// Uniform in (0, 1) from 52 bits of two words: (2m + 1) 2^-53 is exact in double.
PRB_HD double u52(uint32_t r0, uint32_t r1) {
  const double m = static_cast<double>(static_cast<int64_t>(r0 >> 6) * 67108864LL +
                                       static_cast<int64_t>(r1 >> 6));
  return add(mul(m, 2.0), 1.0) * 1.1102230246251565e-16;
}

// ---- log, exp, normal quantile from correctly rounded operations only ----
constexpr double kLn2 = 0.69314718055994529;
constexpr double kSqrtHalf = 0.70710678118654757;

// Natural log of x > 0 (finite): x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s).
PRB_HD double log_rn(double x) {
  int e = 0;
  double m = ::frexp(x, &e);  // m in [0.5, 1), exact
  if (m < kSqrtHalf) {
    m = m * 2.0;  // exact
    e -= 1;
  }
  const double s = div(sub(m, 1.0), add(m, 1.0));
  const double s2 = mul(s, s);
  // 2 * sum_{j=0..10} s^(2j+1) / (2j+1), Horner in s2 from the highest term.
  double p = 0.095238095238095233;  // 2/21
  p = add(mul(p, s2), 0.10526315789473684);  // 2/19
  p = add(mul(p, s2), 0.11764705882352941);  // 2/17
  p = add(mul(p, s2), 0.13333333333333333);  // 2/15
  p = add(mul(p, s2), 0.15384615384615385);  // 2/13
  p = add(mul(p, s2), 0.18181818181818182);  // 2/11
  p = add(mul(p, s2), 0.22222222222222221);  // 2/9
  p = add(mul(p, s2), 0.2857142857142857);   // 2/7
  p = add(mul(p, s2), 0.40000000000000002);  // 2/5
  p = add(mul(p, s2), 0.66666666666666663);  // 2/3
  p = add(mul(p, s2), 2.0);
  return add(mul(static_cast<double>(e), kLn2), mul(p, s));
}

// exp(x) for x in [-700, 700] (clamped): x = k ln2 + r, |r| <= ln2/2, Taylor to degree 14.
PRB_HD double exp_rn(double x) {
  x = x < -700.0 ? -700.0 : (x > 700.0 ? 700.0 : x);
  const double k = ::floor(add(mul(x, 1.4426950408889634), 0.5));
  // ln2 split so that k * kLn2Hi is exact for |k| < 2^11.
  const double r = sub(sub(x, mul(k, 0.693145751953125)), mul(k, 1.4286068202862268e-06));
  double p = 1.1470745597729725e-11;  // 1/14!
  const double inv[13] = {1.6059043836821613e-10, 2.08767569878681e-09, 2.505210838544172e-08,
                          2.755731922398589e-07, 2.7557319223985893e-06, 2.4801587301587302e-05,
                          0.00019841269841269841, 0.0013888888888888889, 0.0083333333333333332,
                          0.041666666666666664, 0.16666666666666666, 0.5, 1.0};
  for (int j = 0; j < 13; ++j) p = add(mul(p, r), inv[j]);
  p = add(mul(p, r), 1.0);
  return ::ldexp(p, static_cast<int>(k));
}

PRB_HD double horner8(const double* c, double x) {
  double p = c[7];
  for (int j = 6; j >= 0; --j) p = add(mul(p, x), c[j]);
  return p;
}

// Inverse normal CDF (Wichura 1988, AS241 PPND16, relative accuracy ~1e-16), p in (0, 1).
PRB_HD double normal_quantile(double p) {
  constexpr double a[8] = {3.3871328727963666080e0, 1.3314166789178437745e+2,
                           1.9715909503065514427e+3, 1.3731693765509461125e+4,
                           4.5921953931549871457e+4, 6.7265770927008700853e+4,
                           3.3430575583588128105e+4, 2.5090809287301226727e+3};
  constexpr double b[8] = {1.0, 4.2313330701600911252e+1, 6.8718700749205790830e+2,
                           5.3941960214247511077e+3, 2.1213794301586595867e+4,
                           3.9307895800092710610e+4, 2.8729085735721942674e+4,
                           5.2264952788528545610e+3};
  constexpr double c[8] = {1.42343711074968357734e0, 4.63033784615654529590e0,
                           5.76949722146069140550e0, 3.64784832476320460504e0,
                           1.27045825245236838258e0, 2.41780725177450611770e-1,
                           2.27238449892691845833e-2, 7.74545014278341407640e-4};
  constexpr double d[8] = {1.0, 2.05319162663775882187e0, 1.67638483018380384940e0,
                           6.89767334985100004550e-1, 1.48103976427480074590e-1,
                           1.51986665636164571966e-2, 5.47593808499534494600e-4,
                           1.05075007164441684324e-9};
  constexpr double e[8] = {6.65790464350110377720e0, 5.46378491116411436990e0,
                           1.78482653991729133580e0, 2.96560571828504891230e-1,
                           2.65321895265761230930e-2, 1.24266094738807843860e-3,
                           2.71155556874348757815e-5, 2.01033439929228813265e-7};
  constexpr double f[8] = {1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1,
                           1.48753612908506148525e-2, 7.86869131145613259100e-4,
                           1.84631831751005468180e-5, 1.42151175831644588870e-7,
                           2.04426310338993978564e-15};
  const double q = sub(p, 0.5);
  if (::fabs(q) <= 0.425) {
    const double r = sub(0.180625, mul(q, q));
    return div(mul(q, horner8(a, r)), horner8(b, r));
  }
  double r = q < 0.0 ? p : sub(1.0, p);
  r = sqrt_rn(-log_rn(r));
  double val;
  if (r <= 5.0) {
    r = sub(r, 1.6);
    val = div(horner8(c, r), horner8(d, r));
  } else {
    r = sub(r, 5.0);
    val = div(horner8(e, r), horner8(f, r));
  }
  return q < 0.0 ? -val : val;
}

// ---- coefficient distributions ----
enum Distribution : int32_t {
  kConstant = 0,   // params: t
  kUniform = 1,    // params: low, high (low < 0 or high > 1 reaches into the vicinity)
  kBernoulli = 2,  // params: p  (lambda in {0, 1}: corners of the hypercube)
  kGaussian = 3,   // params: mean, std, clip_low, clip_high (+-inf: no clip)
  kBeta = 4,       // params: alpha, beta
};

// How many coefficients one Philox call serves (consecutive indices share a block).
PRB_HD int lanes(int32_t dist) {
  return dist == kUniform || dist == kBernoulli ? 4 : (dist == kGaussian ? 2 : 1);
}

constexpr int kMaxGammaAttempts = 64;

// log of a Gamma(shape) variate (Marsaglia & Tsang 2000; shape < 1 boosted by u^(1/shape)).
// Attempt j of component c uses stream word ((c + 1) << 24) | j.
PRB_HD double log_gamma_variate(double shape, uint64_t seed, uint32_t sample, uint64_t index,
                                uint32_t component) {
  const double a = shape < 1.0 ? add(shape, 1.0) : shape;
  const double d = sub(a, 0.33333333333333331);
  const double c = div(1.0, sqrt_rn(mul(9.0, d)));
  double v = 1.0, boost = 0.5;
  for (int j = 0; j < kMaxGammaAttempts; ++j) {
    const U32x4 r = draw(seed, sample, index, ((component + 1u) << 24) | static_cast<uint32_t>(j));
    const double z = normal_quantile(u52(r.v[0], r.v[1]));
    const double w = add(1.0, mul(c, z));
    if (w <= 0.0) continue;
    v = mul(mul(w, w), w);
    boost = u32(r.v[3]);
    const double rhs = add(sub(add(mul(mul(0.5, z), z), d), mul(d, v)), mul(d, log_rn(v)));
    if (log_rn(u32(r.v[2])) < rhs) break;
  }
  double lg = log_rn(mul(d, v));
  if (shape < 1.0) lg = add(lg, div(log_rn(boost), shape));
  return lg;
}

// lambda of one lane of a Philox block, for the lane distributions (uniform, bernoulli, gaussian).
PRB_HD double lane_coefficient(int32_t dist, const double* params, const U32x4& r, int lane) {
  switch (dist) {
    case kUniform:
      return add(params[0], mul(sub(params[1], params[0]), u24(r.v[lane])));
    case kBernoulli:
      return static_cast<double>(u24(r.v[lane]) < params[0]);  // branchless: λ is random
    default: {  // kGaussian: lane l reads words 2l and 2l+1
      double x = add(params[0], mul(params[1], normal_quantile(u52(r.v[2 * lane], r.v[2 * lane + 1]))));
      x = x < params[2] ? params[2] : x;
      return x > params[3] ? params[3] : x;
    }
  }
}

// lambda for coefficient `index` of sample `sample`, in double.
PRB_HD double coefficient(int32_t dist, const double* params, uint64_t seed, uint32_t sample,
                          uint64_t index) {
  if (dist == kConstant) return params[0];
  if (dist == kBeta) {  // X / (X + Y) = 1 / (1 + exp(log Y - log X))
    const double lx = log_gamma_variate(params[0], seed, sample, index, 0u);
    const double ly = log_gamma_variate(params[1], seed, sample, index, 1u);
    return div(1.0, add(1.0, exp_rn(sub(ly, lx))));
  }
  const uint64_t n = static_cast<uint64_t>(lanes(dist));
  return lane_coefficient(dist, params, draw(seed, sample, index / n, 0u), static_cast<int>(index % n));
}

// Remembers the last coefficient and the last Philox block, so that a run of elements sharing a
// coefficient costs one evaluation and consecutive element coefficients share one Philox call.
struct CoefficientCache {
  int64_t index = -1;
  double value = 0.0;
  int64_t block = -1;
  U32x4 words{{0u, 0u, 0u, 0u}};

  PRB_HD double get(int32_t dist, const double* params, uint64_t seed, uint32_t sample,
                    int64_t idx) {
    if (idx == index) return value;
    index = idx;
    if (dist == kConstant || dist == kBeta) {
      value = coefficient(dist, params, seed, sample, static_cast<uint64_t>(idx));
      return value;
    }
    const int64_t n = lanes(dist);
    const int64_t blk = idx / n;
    if (blk != block) {
      block = blk;
      words = draw(seed, sample, static_cast<uint64_t>(blk), 0u);
    }
    value = lane_coefficient(dist, params, words, static_cast<int>(idx - blk * n));
    return value;
  }
};

}  // namespace rng
}  // namespace pyrebasin
