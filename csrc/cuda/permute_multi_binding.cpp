// CUDA binding of pyrebasin::permute_multi: checks, descriptor upload, one launch on the current
// stream. Compiled only when torch has CUDA (see setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

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
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& x = tensors[t];
    TORCH_CHECK(x.device() == tensors[0].device(), "permute_multi: tensors[", t, "] is on ",
                x.device(), " but tensors[0] is on ", tensors[0].device());
    auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    outputs.push_back(out);
    if (x.numel() == 0) continue;
    PermuteTensorDesc d{};
    d.src = static_cast<const char*>(x.const_data_ptr());
    d.dst = static_cast<char*>(out.mutable_data_ptr());
    d.numel = x.numel();
    d.ndim = static_cast<int32_t>(x.dim());
    d.elem_size = static_cast<int32_t>(x.element_size());
    for (int a = 0; a < x.dim(); ++a) {
      d.sizes[a] = x.size(a);
      d.src_strides[a] = x.stride(a);
      const auto& idx = per_tensor[t][a];
      d.index[a] = idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr;
    }
    descs.push_back(d);
    offsets.push_back(offsets.back() + x.numel());
  }
  if (descs.empty()) return outputs;
  // Descriptors travel as raw bytes in one small device tensor (one H2D copy on the stream).
  const int64_t desc_bytes = static_cast<int64_t>(descs.size() * sizeof(PermuteTensorDesc));
  auto host = at::empty({desc_bytes + static_cast<int64_t>(offsets.size() * sizeof(int64_t))},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), descs.data(), desc_bytes);
  std::memcpy(static_cast<char*>(host.data_ptr()) + desc_bytes, offsets.data(),
              offsets.size() * sizeof(int64_t));
  auto dev = host.to(tensors[0].device(), /*non_blocking=*/true);
  const auto* dev_descs = reinterpret_cast<const PermuteTensorDesc*>(dev.const_data_ptr());
  const auto* dev_offsets =
      reinterpret_cast<const int64_t*>(static_cast<const char*>(dev.const_data_ptr()) + desc_bytes);
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
