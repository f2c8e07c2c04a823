// CPU kernel of pyrebasin::combine_batched: K combinations b + lambda_k * (a - b) of every tensor of
// a state dict in one parallel region, lambda drawn in-kernel by the counter-based RNG (philox.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "pyrebasin/combine_batched.h"
#include "pyrebasin/combine_batched_checks.h"
#include "pyrebasin/philox_batch.h"

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
// (~4x the cost of the arithmetic it feeds). Here rng::kBatchBlocks Philox blocks are drawn at once
// (philox_batch.h: AVX2 where the CPU has it, a vectorisable loop elsewhere), the u24 -> lambda map
// runs over the batch as a vectorisable loop, and a plain b + lambda (a - b) loop consumes the stack
// buffer. Same operations, same rounding (every double/float op is IEEE-exact per lane and
// -ffp-contract=off forbids FMA): bit-identical to combine_span and to the reference.
constexpr int kLanesPerBatch = 4 * rng::kBatchBlocks;  // coefficients per batch

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
    rng::philox_batch(p.seed, sample, static_cast<uint64_t>(first >> 2), words);
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
      case DType::kFloat32: combine_span_cpu<float, float>(d, p, k, t.begin, t.end); break;
      case DType::kFloat64: combine_span_cpu<double, double>(d, p, k, t.begin, t.end); break;
      case DType::kFloat16: combine_span_cpu<at::Half, float>(d, p, k, t.begin, t.end); break;
      case DType::kBFloat16: combine_span_cpu<at::BFloat16, float>(d, p, k, t.begin, t.end); break;
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
