// Argument checks and the kernel view of each tensor, shared by the CPU and CUDA bindings of
// permute_multi: caller errors name the offending tensor, axis and size, so a bad spec never reaches a kernel.
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

// The kernel view of tensor x, whose axis a is gathered by idx[a] (undefined: not permuted). Dims are
// coalesced, innermost first: a dim joins the block to its right when neither is permuted and the
// source is contiguous across them; unpermuted size-1 dims vanish. Conv weights [O, I, k, k] become
// [O, I, k*k] (rows of k*k elements instead of k), and a buffer of any rank that no perm touches
// becomes one dim when contiguous. Returns false when the view still has more than kMaxPermuteDims
// dims (then permute_in_stages applies).
inline bool coalesced_desc(const at::Tensor& x, const std::vector<at::Tensor>& idx,
                           PermuteTensorDesc& d) {
  int64_t sizes[kMaxPermuteDims], strides[kMaxPermuteDims];
  const int64_t* index[kMaxPermuteDims];
  int n = 0;  // built innermost-first
  bool last_permuted = false;
  for (int64_t a = x.dim() - 1; a >= 0; --a) {
    const bool permuted = idx[a].defined();
    if (x.size(a) == 1 && !permuted) continue;
    if (n > 0 && !permuted && !last_permuted && x.stride(a) == strides[n - 1] * sizes[n - 1]) {
      sizes[n - 1] *= x.size(a);
      continue;
    }
    if (n == kMaxPermuteDims) return false;
    sizes[n] = x.size(a);
    strides[n] = x.stride(a);
    index[n] = permuted ? idx[a].const_data_ptr<int64_t>() : nullptr;
    last_permuted = permuted;
    ++n;
  }
  if (n == 0) {  // every dim had size 1 (or x is a scalar)
    sizes[0] = 1;
    strides[0] = 1;
    index[0] = nullptr;
    n = 1;
  }
  d = PermuteTensorDesc{};
  d.src = static_cast<const char*>(x.const_data_ptr());
  d.dst = nullptr;  // the caller sets it once the output exists
  d.numel = x.numel();
  d.ndim = n;
  d.elem_size = static_cast<int32_t>(x.element_size());
  for (int a = 0; a < n; ++a) {
    d.sizes[a] = sizes[n - 1 - a];
    d.src_strides[a] = strides[n - 1 - a];
    d.index[a] = index[n - 1 - a];
  }
  return true;
}

// A tensor whose view is too deep for one pass (more than kMaxPermuteDims dims after coalescing:
// many permuted axes, or a high-rank non-contiguous source): gathered through contiguous
// intermediates, at most 3 permuted axes per stage, so that every stage coalesces to <= 7 dims.
// `gather(tensors, indices, owners, axes)` is the device's permute_multi.
template <typename Gather>
at::Tensor permute_in_stages(const at::Tensor& x, const std::vector<at::Tensor>& idx, Gather gather) {
  at::Tensor cur = x.contiguous();
  std::vector<at::Tensor> indices;
  std::vector<int64_t> axes;
  for (int64_t a = 0; a < x.dim(); ++a) {
    if (idx[a].defined()) {
      indices.push_back(idx[a]);
      axes.push_back(a);
    }
    if (!indices.empty() && (indices.size() == 3 || a == x.dim() - 1)) {
      cur = gather({cur}, indices, std::vector<int64_t>(indices.size(), 0), axes)[0];
      indices.clear();
      axes.clear();
    }
  }
  return cur.is_same(x) ? cur.clone() : cur;  // always a new tensor, like every other output
}

}  // namespace pyrebasin
