// CUDA binding of pyrebasin::combine_batched: checks, descriptor upload, one launch on the current
// stream for every tensor and sample. Compiled only when torch has CUDA (see setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "pyrebasin/combine_batched.h"
#include "pyrebasin/combine_batched_checks.h"

namespace pyrebasin {

cudaError_t combine_batched_cuda_launch(const CombineTensorDesc* descs, const int64_t* span_offsets,
                                        int64_t n_tensors, int64_t spans_per_sample,
                                        int64_t num_samples, const CombineParams& params,
                                        int sm_count, cudaStream_t stream);

std::vector<at::Tensor> combine_batched_cuda(at::TensorList a, at::TensorList b,
                                             at::IntArrayRef coef_base, at::IntArrayRef coef_div,
                                             at::IntArrayRef coef_mod, c10::string_view distribution,
                                             at::ArrayRef<double> params, int64_t seed,
                                             int64_t sample_begin, int64_t num_samples) {
  std::vector<CombineTensorDesc> descs;
  CombineParams cp;
  std::vector<at::Tensor> keep;
  if (a.empty()) return {};
  const c10::cuda::CUDAGuard guard(a[0].device());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].device() == a[0].device(), "combine_batched: a[", i, "] is on ",
                a[i].device(), " but a[0] is on ", a[0].device());
  }
  auto outputs = prepare_combine_batched(a, b, coef_base, coef_div, coef_mod,
                                         std::string(distribution), params, seed, sample_begin,
                                         num_samples, c10::kCUDA, descs, cp, keep);
  if (descs.empty()) return outputs;
  constexpr int64_t kSpan = 4;  // as in combine_batched.cu
  std::vector<int64_t> offsets{0};
  for (const auto& d : descs) offsets.push_back(offsets.back() + (d.numel + kSpan - 1) / kSpan);
  // Descriptors and offsets travel as raw bytes in one small device tensor (one H2D copy).
  const int64_t desc_bytes = static_cast<int64_t>(descs.size() * sizeof(CombineTensorDesc));
  auto host = at::empty({desc_bytes + static_cast<int64_t>(offsets.size() * sizeof(int64_t))},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), descs.data(), desc_bytes);
  std::memcpy(static_cast<char*>(host.data_ptr()) + desc_bytes, offsets.data(),
              offsets.size() * sizeof(int64_t));
  auto dev = host.to(a[0].device(), /*non_blocking=*/true);
  const auto* dev_descs = reinterpret_cast<const CombineTensorDesc*>(dev.const_data_ptr());
  const auto* dev_offsets =
      reinterpret_cast<const int64_t*>(static_cast<const char*>(dev.const_data_ptr()) + desc_bytes);
  const auto* props = at::cuda::getCurrentDeviceProperties();
  C10_CUDA_CHECK(combine_batched_cuda_launch(dev_descs, dev_offsets,
                                             static_cast<int64_t>(descs.size()), offsets.back(),
                                             num_samples, cp, props->multiProcessorCount,
                                             at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outputs;
}

TORCH_LIBRARY_IMPL(pyrebasin, CUDA, m) { m.impl("combine_batched", &combine_batched_cuda); }

}  // namespace pyrebasin
