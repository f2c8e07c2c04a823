// CPU kernel of pyrebasin::combine_batched: K combinations b + lambda_k * (a - b) of every tensor of
// a state dict in one parallel region, lambda drawn in-kernel by the counter-based RNG (philox.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PRB_HAVE_AVX2_PATH 1
#endif

#include "pyrebasin/combine_batched.h"
#include "pyrebasin/combine_batched_checks.h"

namespace pyrebasin {
namespace {

// A unit of parallel work: elements [begin, end) of one tensor, for every sample. Looping over the
// samples inside keeps the a and b block in cache while the K outputs stream out.
struct Task {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// ---- element granularity, 4-lane distributions (uniform, bernoulli): the vector path ----
// combine_span draws one Philox block per 4 coefficients through a scalar call and a per-lane switch
// (~4x the cost of the arithmetic it feeds). Here kBlocks Philox blocks are drawn at once (8 per
// AVX2 vector where the CPU has it, chosen at run time; a structure-of-arrays loop elsewhere), the
// u24 -> lambda map runs over the batch as a vectorisable loop, and a plain b + lambda (a - b) loop
// consumes the stack buffer. Same operations, same rounding (every double/float op is IEEE-exact per
// lane and -ffp-contract=off forbids FMA): bit-identical to combine_span and to the reference. No
// -march flags: the wheel runs on any x86-64 (or other) CPU.
constexpr int kBlocks = 32;                  // Philox blocks per batch
constexpr int kLanesPerBatch = 4 * kBlocks;  // coefficients per batch

// Words of Philox blocks [blk0, blk0 + kBlocks) of (seed, sample), stream 0 (rng::draw), in
// coefficient order: w[4 j + l] = word l of block blk0 + j. Portable structure-of-arrays version.
void philox_batch_soa(uint64_t seed, uint32_t sample, uint64_t blk0, uint32_t* w) {
  uint32_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  for (int j = 0; j < kBlocks; ++j) {
    const uint64_t blk = blk0 + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(blk);
    c1[j] = static_cast<uint32_t>(blk >> 32);
    c2[j] = sample;
    c3[j] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int j = 0; j < kBlocks; ++j) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[j];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(p1);
      c3[j] = static_cast<uint32_t>(p0);
      c0[j] = n0;
      c2[j] = n2;
    }
  }
  for (int j = 0; j < kBlocks; ++j) {
    w[4 * j] = c0[j];
    w[4 * j + 1] = c1[j];
    w[4 * j + 2] = c2[j];
    w[4 * j + 3] = c3[j];
  }
}

#ifdef PRB_HAVE_AVX2_PATH
// hi and lo 32-bit halves of m * c for 8 lanes (even and odd lanes through two 32x32->64 multiplies).
__attribute__((target("avx2"))) inline void mulhilo8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox_batch_soa for x86-64 CPUs with AVX2 (chosen at run time): 8 Philox blocks per vector, the
// words stored in coefficient order w[4 j + l] (a 4x8 transpose per 8 blocks).
__attribute__((target("avx2"))) void philox_batch_avx2(uint64_t seed, uint32_t sample, uint64_t blk0,
                                                       uint32_t* w) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int g = 0; g < kBlocks; g += 8) {
    const uint64_t blk = blk0 + static_cast<uint64_t>(g);  // caller: low word does not wrap in a batch
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk))), iota);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk >> 32)));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(sample));
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round > 0) {
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
      }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(m0, c0, hi0, lo0);
      mulhilo8(m1, c2, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
    }
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i* out = reinterpret_cast<__m256i*>(w + 4 * g);
    _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
}
#endif

void philox_batch(uint64_t seed, uint32_t sample, uint64_t blk0, uint32_t* w) {
#ifdef PRB_HAVE_AVX2_PATH
  static const bool avx2 = __builtin_cpu_supports("avx2");
  // The vector path adds the block offset in 32 bits: batches crossing a 2^32 boundary go scalar.
  if (avx2 && static_cast<uint32_t>(blk0) <= UINT32_MAX - kBlocks) {
    philox_batch_avx2(seed, sample, blk0, w);
    return;
  }
#endif
  philox_batch_soa(seed, sample, blk0, w);
}

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define PRB_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PRB_CPU_CLONES
#endif

// lambda of coefficients 4 * blk0 + [0, kLanesPerBatch), as rng::lane_coefficient computes them
// (double), rounded to opmath_t as combine_span does.
template <typename opmath_t>
PRB_CPU_CLONES void lambda_batch(int32_t dist, const double* params, const uint32_t* w, opmath_t* lam) {
  if (dist == rng::kUniform) {
    const double lo = params[0], span = rng::sub(params[1], params[0]);
    for (int i = 0; i < kLanesPerBatch; ++i) {
      lam[i] = static_cast<opmath_t>(lo + span * rng::u24(w[i]));
    }
  } else {  // bernoulli
    const double prob = params[0];
    for (int i = 0; i < kLanesPerBatch; ++i) {
      lam[i] = static_cast<opmath_t>(rng::u24(w[i]) < prob);
    }
  }
}

template <typename scalar_t, typename opmath_t>
void combine_span_element4(const CombineTensorDesc& d, const CombineParams& p, int64_t k,
                           int64_t e0, int64_t e1) {
  const scalar_t* a = static_cast<const scalar_t*>(d.a);
  const scalar_t* b = static_cast<const scalar_t*>(d.b);
  scalar_t* out = static_cast<scalar_t*>(d.out) + k * d.numel;
  const uint32_t sample = static_cast<uint32_t>(p.sample_begin + k);
  alignas(64) uint32_t words[kLanesPerBatch];
  alignas(64) opmath_t lam[kLanesPerBatch];
  int64_t q = e0 % d.coef_mod;
  int64_t e = e0;
  while (e < e1) {
    // Coefficients of [e, e + n) are idx0 + [0, n): a run inside one period of the index map.
    const int64_t idx0 = d.coef_base + q;
    const int64_t first = idx0 & ~int64_t{3};  // batches start on a Philox block boundary
    const int64_t skip = idx0 - first;
    int64_t n = kLanesPerBatch - skip;
    n = n < e1 - e ? n : e1 - e;
    n = n < d.coef_mod - q ? n : d.coef_mod - q;
    philox_batch(p.seed, sample, static_cast<uint64_t>(first >> 2), words);
    lambda_batch<opmath_t>(p.dist, p.params, words, lam);
    const opmath_t* lm = lam + skip;
    const scalar_t* ae = a + e;
    const scalar_t* be = b + e;
    scalar_t* oe = out + e;
    for (int64_t j = 0; j < n; ++j) {
      const opmath_t av = static_cast<opmath_t>(ae[j]);
      const opmath_t bv = static_cast<opmath_t>(be[j]);
      oe[j] = static_cast<scalar_t>(bv + lm[j] * (av - bv));
    }
    e += n;
    q += n;
    if (q == d.coef_mod) q = 0;
  }
}

template <typename scalar_t, typename opmath_t>
void combine_span_cpu(const CombineTensorDesc& d, const CombineParams& p, int64_t k, int64_t e0,
                      int64_t e1) {
  if (d.coef_div == 1 && (p.dist == rng::kUniform || p.dist == rng::kBernoulli)) {
    combine_span_element4<scalar_t, opmath_t>(d, p, k, e0, e1);
  } else {
    combine_span<scalar_t, opmath_t>(d, p, k, e0, e1);
  }
}

void run_task(const CombineTensorDesc& d, const CombineParams& p, int64_t num_samples,
              const Task& t) {
  for (int64_t k = 0; k < num_samples; ++k) {
    switch (d.dtype) {
      case kF32: combine_span_cpu<float, float>(d, p, k, t.begin, t.end); break;
      case kF64: combine_span_cpu<double, double>(d, p, k, t.begin, t.end); break;
      case kF16: combine_span_cpu<at::Half, float>(d, p, k, t.begin, t.end); break;
      default: combine_span_cpu<at::BFloat16, float>(d, p, k, t.begin, t.end); break;
    }
  }
}

}  // namespace

std::vector<at::Tensor> combine_batched_cpu(at::TensorList a, at::TensorList b,
                                            at::IntArrayRef coef_base, at::IntArrayRef coef_div,
                                            at::IntArrayRef coef_mod, c10::string_view distribution,
                                            at::ArrayRef<double> params, int64_t seed,
                                            int64_t sample_begin, int64_t num_samples) {
  std::vector<CombineTensorDesc> descs;
  CombineParams cp;
  std::vector<at::Tensor> keep;
  auto outputs = prepare_combine_batched(a, b, coef_base, coef_div, coef_mod,
                                         std::string(distribution), params, seed, sample_begin,
                                         num_samples, c10::kCPU, descs, cp, keep);
  // 4096 elements (16 KiB of float32 per input) per task: a and b stay in L1 across the samples.
  constexpr int64_t kTaskElems = 4096;
  std::vector<Task> tasks;
  for (size_t t = 0; t < descs.size(); ++t) {
    for (int64_t e = 0; e < descs[t].numel; e += kTaskElems) {
      tasks.push_back({static_cast<int64_t>(t), e, std::min(descs[t].numel, e + kTaskElems)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_task(descs[tasks[i].tensor], cp, num_samples, tasks[i]);
  });
  return outputs;
}

TORCH_LIBRARY_IMPL(pyrebasin, CPU, m) { m.impl("combine_batched", &combine_batched_cpu); }

}  // namespace pyrebasin
