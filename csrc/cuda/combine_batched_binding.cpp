// CUDA binding of pyrebasin::combine_batched: checks, descriptor upload, one launch on the current
// stream for every tensor and sample. Compiled only when torch has CUDA (see setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "device_upload.h"
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
  std::vector<int64_t> offsets{0};  // first span of each tensor
  for (const auto& d : descs) {
    offsets.push_back(offsets.back() + (d.numel + kCombineSpan - 1) / kCombineSpan);
  }
  at::Tensor dev;
  const auto [dev_descs, dev_offsets] = upload_descriptors(descs, offsets, a[0].device(), dev);
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
