// CPU kernel of pyrebasin::permute_multi: every tensor of a state dict gathered along all of its
// permuted axes in one pass (one read + one write per element, like clone()), in one parallel region.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "pyrebasin/permute_multi.h"
#include "pyrebasin/permute_multi_checks.h"

namespace pyrebasin {
namespace {

struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

// A unit of parallel work: rows [row_begin, row_end) of one tensor viewed as [rows, last_dim].
struct Task {
  int64_t tensor;
  int64_t row_begin;
  int64_t row_end;
};

// A row is the last dim (row_dims == 1) or, when the last dim is a short unpermuted contiguous
// block, the last two dims (row_dims == 2: a gathered dim of small blocks, e.g. a conv weight's input
// channels x k*k taps), so that the per-row index arithmetic is paid once per many elements.
template <typename elem_t>
void permute_rows(const PermuteTensorDesc& d, int row_dims, const int32_t* inner_index32,
                  int64_t row_begin, int64_t row_end) {
  const auto* src = reinterpret_cast<const elem_t*>(d.src);
  auto* dst = reinterpret_cast<elem_t*>(d.dst);
  const int lead = d.ndim - row_dims;
  const int last = d.ndim - 1;
  const int64_t inner = d.sizes[last];
  const int64_t inner_stride = d.src_strides[last];
  const int64_t* inner_index = d.index[last];
  const int64_t row_len = row_dims == 2 ? d.sizes[lead] * inner : inner;

  // Coordinates of row_begin over the leading dims, then advanced like an odometer.
  int64_t coord[kMaxPermuteDims] = {0};
  int64_t r = row_begin;
  for (int a = lead - 1; a >= 0; --a) {
    coord[a] = r % d.sizes[a];
    r /= d.sizes[a];
  }
  for (int64_t row = row_begin; row < row_end; ++row) {
    int64_t base = 0;
    for (int a = 0; a < lead; ++a) {
      const int64_t c = d.index[a] ? d.index[a][coord[a]] : coord[a];
      base += c * d.src_strides[a];
    }
    elem_t* out = dst + row * row_len;
    const elem_t* in = src + base;
    if (row_dims == 2) {
      const int64_t groups = d.sizes[lead], group_stride = d.src_strides[lead];
      const int64_t* group_index = d.index[lead];
      for (int64_t g = 0; g < groups; ++g, out += inner) {
        const elem_t* blk = in + (group_index ? group_index[g] : g) * group_stride;
        for (int64_t j = 0; j < inner; ++j) out[j] = blk[j];
      }
    } else if (inner_index32 && inner_stride == 1) {
      // 32-bit source offsets: half the index bytes, so index + row stay cache-resident.
      for (int64_t j = 0; j < inner; ++j) out[j] = in[inner_index32[j]];
    } else if (inner_index) {
      for (int64_t j = 0; j < inner; ++j) out[j] = in[inner_index[j] * inner_stride];
    } else if (inner_stride == 1) {
      std::memcpy(out, in, sizeof(elem_t) * inner);
    } else {
      for (int64_t j = 0; j < inner; ++j) out[j] = in[j * inner_stride];
    }
    for (int a = lead - 1; a >= 0; --a) {
      if (++coord[a] < d.sizes[a]) break;
      coord[a] = 0;
    }
  }
}

void run_task(const PermuteTensorDesc& d, int row_dims, const int32_t* idx32, const Task& t) {
  switch (d.elem_size) {
    case 1: return permute_rows<uint8_t>(d, row_dims, idx32, t.row_begin, t.row_end);
    case 2: return permute_rows<uint16_t>(d, row_dims, idx32, t.row_begin, t.row_end);
    case 4: return permute_rows<uint32_t>(d, row_dims, idx32, t.row_begin, t.row_end);
    case 8: return permute_rows<uint64_t>(d, row_dims, idx32, t.row_begin, t.row_end);
    case 16: return permute_rows<Bytes16>(d, row_dims, idx32, t.row_begin, t.row_end);
  }
  TORCH_INTERNAL_ASSERT(false, "permute_multi: element size ", d.elem_size);
}

}  // namespace

std::vector<at::Tensor> permute_multi_cpu(at::TensorList tensors, at::TensorList indices,
                                          at::IntArrayRef owners, at::IntArrayRef axes) {
  const auto per_tensor = check_permute_multi_args(tensors, indices, owners, axes, c10::kCPU);
  std::vector<at::Tensor> outputs;
  outputs.reserve(tensors.size());
  std::vector<PermuteTensorDesc> descs;
  descs.reserve(tensors.size());
  std::vector<Task> tasks;
  std::vector<at::Tensor> inner32;  // per desc: int32 copy of the last axis' index (or undefined)
  std::vector<int> row_dims_of;     // per desc: 1 or 2 dims per row (see permute_rows)
  // ~64 KiB per task: large enough to amortise scheduling, small enough to balance two cores on a
  // single big matrix.
  constexpr int64_t kTaskBytes = 1 << 16;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& x = tensors[t];
    auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    outputs.push_back(out);
    if (x.numel() == 0) continue;
    if (x.dim() == 0) {
      out.copy_(x);
      continue;
    }
    // Coalesce, innermost first: a dim joins the block to its right when neither is permuted and
    // the source is contiguous across them; unpermuted size-1 dims vanish. Conv weights [O, I, k, k]
    // become [O, I, k*k]: rows of k*k elements instead of k, so per-row overhead stops dominating.
    std::vector<int64_t> sizes, strides;
    std::vector<at::Tensor> idxs;
    for (int64_t a = x.dim() - 1; a >= 0; --a) {
      const auto& idx = per_tensor[t][a];
      if (x.size(a) == 1 && !idx.defined()) continue;
      if (!sizes.empty() && !idx.defined() && !idxs.back().defined() &&
          x.stride(a) == strides.back() * sizes.back()) {
        sizes.back() *= x.size(a);
        continue;
      }
      sizes.push_back(x.size(a));
      strides.push_back(x.stride(a));
      idxs.push_back(idx);
    }
    if (sizes.empty()) {  // every dim had size 1
      sizes.push_back(1);
      strides.push_back(1);
      idxs.emplace_back();
    }
    PermuteTensorDesc d{};
    d.src = static_cast<const char*>(x.const_data_ptr());
    d.dst = static_cast<char*>(out.mutable_data_ptr());
    d.numel = x.numel();
    d.ndim = static_cast<int32_t>(sizes.size());
    d.elem_size = static_cast<int32_t>(x.element_size());
    for (int a = 0; a < d.ndim; ++a) {
      const size_t r = sizes.size() - 1 - a;  // built innermost-first
      d.sizes[a] = sizes[r];
      d.src_strides[a] = strides[r];
      d.index[a] = idxs[r].defined() ? idxs[r].const_data_ptr<int64_t>() : nullptr;
    }
    // Short contiguous unpermuted last dim (< 64 elements): rows span the last two dims.
    const int row_dims = (d.ndim >= 2 && !d.index[d.ndim - 1] && d.src_strides[d.ndim - 1] == 1 &&
                          d.sizes[d.ndim - 1] < 64) ? 2 : 1;
    row_dims_of.push_back(row_dims);
    const int64_t inner = row_dims == 2 ? d.sizes[d.ndim - 1] * d.sizes[d.ndim - 2] : d.sizes[d.ndim - 1];
    const int64_t rows = x.numel() / inner;
    const int64_t rows_per_task =
        std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, inner * x.element_size()));
    const int64_t id = static_cast<int64_t>(descs.size());
    descs.push_back(d);
    const auto& last_idx = idxs.front();
    inner32.push_back(last_idx.defined() && strides.front() == 1 && d.ndim > 1 &&
                              inner <= std::numeric_limits<int32_t>::max()
                          ? last_idx.to(at::kInt)
                          : at::Tensor());
    for (int64_t r = 0; r < rows; r += rows_per_task) {
      tasks.push_back({id, r, std::min(rows, r + rows_per_task)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto& idx32 = inner32[tasks[i].tensor];
      run_task(descs[tasks[i].tensor], row_dims_of[tasks[i].tensor],
               idx32.defined() ? idx32.const_data_ptr<int32_t>() : nullptr, tasks[i]);
    }
  });
  return outputs;
}

TORCH_LIBRARY_IMPL(pyrebasin, CPU, m) { m.impl("permute_multi", &permute_multi_cpu); }

}  // namespace pyrebasin
