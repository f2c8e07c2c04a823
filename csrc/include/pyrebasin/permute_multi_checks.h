// Argument checks shared by the CPU and CUDA bindings of permute_multi: caller errors name the
// offending tensor, axis and size, so a bad spec never reaches a kernel.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "pyrebasin/permute_multi.h"

namespace pyrebasin {

// Returns, per tensor, the normalised axis -> index tensor map (undefined where not permuted).
inline std::vector<std::vector<at::Tensor>> check_permute_multi_args(
    at::TensorList tensors, at::TensorList indices, at::IntArrayRef owners, at::IntArrayRef axes,
    c10::DeviceType device_type) {
  TORCH_CHECK(indices.size() == owners.size() && owners.size() == axes.size(),
              "permute_multi: indices, owners and axes must have the same length, got ",
              indices.size(), ", ", owners.size(), " and ", axes.size());
  std::vector<std::vector<at::Tensor>> per_tensor(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& x = tensors[t];
    TORCH_CHECK(x.device().type() == device_type, "permute_multi: tensors[", t, "] is on ",
                x.device(), " but this kernel runs on ", c10::DeviceTypeName(device_type));
    TORCH_CHECK(x.dim() <= kMaxPermuteDims, "permute_multi: tensors[", t, "] has ", x.dim(),
                " dims; at most ", kMaxPermuteDims, " are supported");
    const auto es = x.element_size();
    TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8 || es == 16, "permute_multi: tensors[",
                t, "] has unsupported element size ", es);
    per_tensor[t].resize(x.dim());
  }
  std::vector<const c10::TensorImpl*> checked;
  for (size_t k = 0; k < indices.size(); ++k) {
    const int64_t owner = owners[k];
    TORCH_CHECK(owner >= 0 && owner < static_cast<int64_t>(tensors.size()),
                "permute_multi: owners[", k, "] = ", owner, " is out of range for ",
                tensors.size(), " tensors");
    const auto& x = tensors[owner];
    TORCH_CHECK(x.dim() > 0, "permute_multi: tensors[", owner, "] is a scalar and has no axis ",
                axes[k]);
    const int64_t axis = axes[k] < 0 ? axes[k] + x.dim() : axes[k];
    TORCH_CHECK(axis >= 0 && axis < x.dim(), "permute_multi: axes[", k, "] = ", axes[k],
                " is out of range for tensors[", owner, "] of shape ", x.sizes());
    TORCH_CHECK(!per_tensor[owner][axis].defined(), "permute_multi: tensors[", owner,
                "] axis ", axis, " is permuted twice");
    const auto& idx = indices[k];
    TORCH_CHECK(idx.scalar_type() == at::kLong, "permute_multi: indices[", k,
                "] must be int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == x.size(axis), "permute_multi: indices[", k,
                "] must have shape [", x.size(axis), "] (tensors[", owner, "].size(", axis,
                ")), got ", idx.sizes());
    TORCH_CHECK(idx.device() == x.device(), "permute_multi: indices[", k, "] is on ",
                idx.device(), " but tensors[", owner, "] is on ", x.device());
    auto contiguous = idx.contiguous();
    const c10::TensorImpl* impl = idx.unsafeGetTensorImpl();
    if (idx.numel() > 0 && std::find(checked.begin(), checked.end(), impl) == checked.end()) {
      // One cheap pass so that a bad index is a caller error, never an out-of-bounds read; once
      // per distinct index tensor (one perm usually permutes many axes), a plain loop on the CPU.
      int64_t lo_v, hi_v;
      if (contiguous.is_cpu()) {
        const int64_t* v = contiguous.const_data_ptr<int64_t>();
        lo_v = hi_v = v[0];
        for (int64_t i = 1; i < contiguous.numel(); ++i) {
          lo_v = std::min(lo_v, v[i]);
          hi_v = std::max(hi_v, v[i]);
        }
      } else {
        auto [lo, hi] = at::aminmax(contiguous);
        lo_v = lo.item<int64_t>();
        hi_v = hi.item<int64_t>();
      }
      TORCH_CHECK(lo_v >= 0 && hi_v < x.size(axis), "permute_multi: indices[", k,
                  "] has values in [", lo_v, ", ", hi_v, "], outside [0, ", x.size(axis), ")");
      checked.push_back(impl);  // its length is x.size(axis), so the range holds wherever it is used
    }
    per_tensor[owner][axis] = std::move(contiguous);
  }
  return per_tensor;
}

}  // namespace pyrebasin
