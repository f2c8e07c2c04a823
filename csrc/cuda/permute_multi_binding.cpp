// CUDA binding of pyrebasin::permute_multi: checks, descriptor upload, one launch on the current
// stream. Compiled only when torch has CUDA (see setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "device_upload.h"
#include "pyrebasin/permute_multi.h"
#include "pyrebasin/permute_multi_checks.h"

namespace pyrebasin {

cudaError_t permute_multi_cuda_launch(const PermuteTensorDesc* descs, const int64_t* offsets,
                                      int64_t n_tensors, int64_t total, int sm_count,
                                      cudaStream_t stream);

std::vector<at::Tensor> permute_multi_cuda(at::TensorList tensors, at::TensorList indices,
                                           at::IntArrayRef owners, at::IntArrayRef axes) {
  const auto per_tensor = check_permute_multi_args(tensors, indices, owners, axes, c10::kCUDA);
  std::vector<at::Tensor> outputs;
  outputs.reserve(tensors.size());
  if (tensors.empty()) return outputs;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<PermuteTensorDesc> descs;
  std::vector<int64_t> offsets{0};
  std::vector<size_t> staged;  // too deep for one pass: permute_in_stages, after the launch
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& x = tensors[t];
    TORCH_CHECK(x.device() == tensors[0].device(), "permute_multi: tensors[", t, "] is on ",
                x.device(), " but tensors[0] is on ", tensors[0].device());
    PermuteTensorDesc d;
    if (x.numel() > 0 && !coalesced_desc(x, per_tensor[t], d)) {
      staged.push_back(t);
      outputs.emplace_back();
      continue;
    }
    auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    outputs.push_back(out);
    if (x.numel() == 0) continue;
    d.dst = static_cast<char*>(out.mutable_data_ptr());
    descs.push_back(d);
    offsets.push_back(offsets.back() + x.numel());
  }
  for (const size_t t : staged) {
    outputs[t] = permute_in_stages(tensors[t], per_tensor[t], permute_multi_cuda);
  }
  if (descs.empty()) return outputs;
  at::Tensor dev;
  const auto [dev_descs, dev_offsets] = upload_descriptors(descs, offsets, tensors[0].device(), dev);
  const auto* props = at::cuda::getCurrentDeviceProperties();
  C10_CUDA_CHECK(permute_multi_cuda_launch(dev_descs, dev_offsets,
                                           static_cast<int64_t>(descs.size()), offsets.back(),
                                           props->multiProcessorCount,
                                           at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outputs;
}

TORCH_LIBRARY_IMPL(pyrebasin, CUDA, m) { m.impl("permute_multi", &permute_multi_cuda); }

}  // namespace pyrebasin
