// CPU kernel of pyrebasin::combine_batched: K combinations b + lambda_k * (a - b) of every tensor of
// a state dict in one parallel region, lambda drawn in-kernel by the counter-based RNG (philox.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

void run_task(const CombineTensorDesc& d, const CombineParams& p, int64_t num_samples,
              const Task& t) {
  for (int64_t k = 0; k < num_samples; ++k) {
    switch (d.dtype) {
      case kF32: combine_span<float, float>(d, p, k, t.begin, t.end); break;
      case kF64: combine_span<double, double>(d, p, k, t.begin, t.end); break;
      case kF16: combine_span<at::Half, float>(d, p, k, t.begin, t.end); break;
      default: combine_span<at::BFloat16, float>(d, p, k, t.begin, t.end); break;
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
