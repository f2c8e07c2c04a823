// Batched CPU Philox: the words of kBatchBlocks consecutive Philox blocks at once, a thin layer over
// philox.h (its constants and round) that CPUs run as vectors. CPU only, free of torch headers.
//
// The portable loop applies rng::philox_round to a structure of arrays (compilers vectorise it);
// on x86-64 CPUs with AVX2 (chosen at run time, no -march flag) 8 blocks share one __m256i round.
// Both equal rng::draw(seed, sample, block, 0) bit for bit (tests/test_rng.py compiles and checks it).
#pragma once
#include <cstdint>

#include "pyrebasin/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PRB_HAVE_AVX2_PHILOX 1
#endif

namespace pyrebasin {
namespace rng {

constexpr int kBatchBlocks = 32;  // Philox blocks per batch (128 words)

// Words of blocks [blk0, blk0 + kBatchBlocks) of (seed, sample), stream 0, in coefficient order:
// w[4 j + l] = word l of rng::draw(seed, sample, blk0 + j, 0).
inline void philox_batch_portable(uint64_t seed, uint32_t sample, uint64_t blk0, uint32_t* w) {
  uint32_t c0[kBatchBlocks], c1[kBatchBlocks], c2[kBatchBlocks], c3[kBatchBlocks];
  for (int j = 0; j < kBatchBlocks; ++j) {
    const uint64_t blk = blk0 + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(blk);
    c1[j] = static_cast<uint32_t>(blk >> 32);
    c2[j] = sample;
    c3[j] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) philox_bump_key(k0, k1);
    for (int j = 0; j < kBatchBlocks; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
  }
  for (int j = 0; j < kBatchBlocks; ++j) {
    w[4 * j] = c0[j];
    w[4 * j + 1] = c1[j];
    w[4 * j + 2] = c2[j];
    w[4 * j + 3] = c3[j];
  }
}

#ifdef PRB_HAVE_AVX2_PHILOX
// hi and lo 32-bit halves of m * c for 8 lanes (even and odd lanes through two 32x32->64 multiplies).
__attribute__((target("avx2"))) inline void mulhilo8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox_batch_portable with philox_round on 8 blocks per vector, then a 4x8 transpose to
// coefficient order. The block offset is added in 32 bits: the caller keeps the batch from
// carrying across a 2^32 boundary of the block counter (philox_batch does).
__attribute__((target("avx2"))) inline void philox_batch_avx2(uint64_t seed, uint32_t sample,
                                                              uint64_t blk0, uint32_t* w) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int g = 0; g < kBatchBlocks; g += 8) {
    const uint64_t blk = blk0 + static_cast<uint64_t>(g);
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk))), iota);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk >> 32)));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(sample));
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      if (round > 0) philox_bump_key(k0, k1);
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

inline bool cpu_has_avx2() {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2;
}
#endif

// The fastest of the two this CPU runs, for any blk0.
inline void philox_batch(uint64_t seed, uint32_t sample, uint64_t blk0, uint32_t* w) {
#ifdef PRB_HAVE_AVX2_PHILOX
  if (cpu_has_avx2() && static_cast<uint32_t>(blk0) <= UINT32_MAX - kBatchBlocks) {
    philox_batch_avx2(seed, sample, blk0, w);
    return;
  }
#endif
  philox_batch_portable(seed, sample, blk0, w);
}

}  // namespace rng
}  // namespace pyrebasin
