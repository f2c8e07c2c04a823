// CPU kernel of pyrebasin::permute_multi: every tensor of a state dict gathered along all of its
// permuted axes in one pass (one read + one write per element, like clone()), in one parallel region.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <vector>

#include "pyrebasin/permute_multi.h"
#include "pyrebasin/permute_multi_checks.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PYREBASIN_PREFETCH(p) __builtin_prefetch(p)
#else
#define PYREBASIN_PREFETCH(p) ((void)(p))
#endif

namespace pyrebasin {
namespace {

constexpr int64_t kLine = 64;  // cache line bytes: the unit of the software prefetch

// How one output row is produced (see plan_rows). A row is the last dim, or the last two dims when
// the last dim is a short unpermuted contiguous block (a conv weight's input channels x k*k taps).
enum class RowKind {
  kBlocks,    // gathered (or strided) blocks of `block` contiguous elements
  kGather32,  // contiguous row gathered through a 32-bit index
  kGather64,  // strided row gathered through the 64-bit index
  kCopy,      // contiguous row, not permuted: memcpy
  kStrided,   // strided row, not permuted
};

struct RowPlan {
  RowKind kind;
  int lead;          // dims before the row
  int64_t row_len;   // output elements per row
  bool prefetch;     // the source of a row is one contiguous span of row_len elements
  bool stream;       // output far larger than the caches: write it with non-temporal stores
  const int32_t* index32;
};

// Copies n bytes (sizeof(T) <= n <= 2 sizeof(T)) as two possibly overlapping T-sized moves.
template <typename T>
inline void copy_two(char* d, const char* s, int64_t n) {
  T a, b;
  std::memcpy(&a, s, sizeof(T));
  std::memcpy(&b, s + n - sizeof(T), sizeof(T));
  std::memcpy(d, &a, sizeof(T));
  std::memcpy(d + n - sizeof(T), &b, sizeof(T));
}

// Copies n bytes, n the same on every call of a row loop (so the size branches predict perfectly);
// small blocks as two possibly overlapping loads/stores instead of a memcpy call.
inline void copy_block(char* d, const char* s, int64_t n) {
  if (n > 64) {
    std::memcpy(d, s, n);
  } else if (n > 32) {  // 3x3 float32 conv taps (36 bytes) land here; source and output never alias
    copy_two<Bytes16>(d, s, 32);
    copy_two<Bytes16>(d + n - 32, s + n - 32, 32);
  } else if (n >= 16) {
    copy_two<Bytes16>(d, s, n);
  } else if (n >= 8) {
    copy_two<uint64_t>(d, s, n);
  } else if (n >= 4) {
    copy_two<uint32_t>(d, s, n);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
  }
}

#if defined(__SSE2__)
// One 64-byte line of gathered output written with non-temporal stores: an output that cannot stay
// in cache anyway skips the read-for-ownership of each line (a third of a copy's memory traffic).
template <typename elem_t>
inline void gather_line_streaming(elem_t* out, const elem_t* in, const int32_t* idx) {
  auto* dst = reinterpret_cast<__m128i*>(out);
  for (int q = 0; q < 4; ++q, idx += 16 / sizeof(elem_t)) {
    __m128i v;
    if constexpr (sizeof(elem_t) == 2) {
      v = _mm_set_epi16(in[idx[7]], in[idx[6]], in[idx[5]], in[idx[4]], in[idx[3]], in[idx[2]],
                        in[idx[1]], in[idx[0]]);
    } else if constexpr (sizeof(elem_t) == 4) {
      v = _mm_set_epi32(in[idx[3]], in[idx[2]], in[idx[1]], in[idx[0]]);
    } else {
      v = _mm_set_epi64x(in[idx[1]], in[idx[0]]);
    }
    _mm_stream_si128(dst + q, v);
  }
}
#endif

// Rows [row_begin, row_end). Rows come in permuted order, so the hardware prefetcher cannot guess
// the next source row: while one row is gathered, the next row's source span is prefetched, one
// line per line of output written, which keeps the gather as fast as a streaming copy.
template <typename elem_t>
void permute_rows(const PermuteTensorDesc& d, const RowPlan& p, int64_t row_begin,
                  int64_t row_end) {
  const auto* src = reinterpret_cast<const elem_t*>(d.src);
  auto* dst = reinterpret_cast<elem_t*>(d.dst);
  const int lead = p.lead;
  const int last = d.ndim - 1;
  const int64_t inner = d.sizes[last];
  const int64_t inner_stride = d.src_strides[last];
  const int64_t* inner_index = d.index[last];
  constexpr int64_t kPer = sizeof(elem_t) >= kLine ? 1 : kLine / sizeof(elem_t);

  int64_t coord[kMaxPermuteDims] = {0};
  int64_t r = row_begin;
  for (int a = lead - 1; a >= 0; --a) {
    coord[a] = r % d.sizes[a];
    r /= d.sizes[a];
  }
  auto row_base = [&]() {
    int64_t base = 0;
    for (int a = 0; a < lead; ++a) base += (d.index[a] ? d.index[a][coord[a]] : coord[a]) * d.src_strides[a];
    return base;
  };
  int64_t base = row_base();
  for (int64_t row = row_begin; row < row_end; ++row) {
    for (int a = lead - 1; a >= 0; --a) {  // odometer: coord of the next row (wraps to row 0)
      if (++coord[a] < d.sizes[a]) break;
      coord[a] = 0;
    }
    const int64_t next_base = row_base();
    const char* pf = reinterpret_cast<const char*>(src + next_base);
    elem_t* out = dst + row * p.row_len;
    const elem_t* in = src + base;
    switch (p.kind) {
      case RowKind::kBlocks: {
        const int64_t groups = d.sizes[lead], group_stride = d.src_strides[lead];
        const int64_t* group_index = d.index[lead];
        const int64_t block_bytes = inner * static_cast<int64_t>(sizeof(elem_t));
        int64_t done = 0, fetched = 0;
        for (int64_t g = 0; g < groups; ++g, out += inner) {
          const elem_t* blk = in + (group_index ? group_index[g] : g) * group_stride;
          copy_block(reinterpret_cast<char*>(out), reinterpret_cast<const char*>(blk), block_bytes);
          if (p.prefetch) {
            for (done += block_bytes; fetched < done; fetched += kLine) PYREBASIN_PREFETCH(pf + fetched);
          }
        }
        break;
      }
      case RowKind::kGather32: {
        const int32_t* idx = p.index32;
        int64_t j = 0;
#if defined(__SSE2__)
        if constexpr (sizeof(elem_t) == 2 || sizeof(elem_t) == 4 || sizeof(elem_t) == 8) {
          if (p.stream && (reinterpret_cast<uintptr_t>(out) & 15) == 0) {
            for (; j + kPer <= inner; j += kPer, pf += kLine) {
              PYREBASIN_PREFETCH(pf);
              gather_line_streaming(out + j, in, idx + j);
            }
          }
        }
#endif
        for (; j + kPer <= inner; j += kPer, pf += kLine) {
          PYREBASIN_PREFETCH(pf);
          for (int64_t k = 0; k < kPer; ++k) out[j + k] = in[idx[j + k]];
        }
        for (; j < inner; ++j) out[j] = in[idx[j]];
        break;
      }
      case RowKind::kGather64:
        for (int64_t j = 0; j < inner; ++j) out[j] = in[inner_index[j] * inner_stride];
        break;
      case RowKind::kCopy: {
        const int64_t bytes = inner * static_cast<int64_t>(sizeof(elem_t));
        if (bytes <= 4096) {
          for (int64_t b = 0; b < bytes; b += kLine) PYREBASIN_PREFETCH(pf + b);
        }
        std::memcpy(out, in, bytes);
        break;
      }
      case RowKind::kStrided:
        for (int64_t j = 0; j < inner; ++j) out[j] = in[j * inner_stride];
        break;
    }
    base = next_base;
  }
#if defined(__SSE2__)
  if (p.stream) _mm_sfence();  // order the non-temporal stores before the parallel region ends
#endif
}

void run_rows(const PermuteTensorDesc& d, const RowPlan& p, int64_t begin, int64_t end) {
  switch (d.elem_size) {
    case 1: return permute_rows<uint8_t>(d, p, begin, end);
    case 2: return permute_rows<uint16_t>(d, p, begin, end);
    case 4: return permute_rows<uint32_t>(d, p, begin, end);
    case 8: return permute_rows<uint64_t>(d, p, begin, end);
    case 16: return permute_rows<Bytes16>(d, p, begin, end);
  }
  TORCH_INTERNAL_ASSERT(false, "permute_multi: element size ", d.elem_size);
}

// Large outputs are first touched by this kernel: asking for transparent huge pages there turns
// one page fault per 4 KiB (the bulk of a fresh multi-GB copy) into one per 2 MiB. Advice only:
// no effect where THP is off, and only the 2 MiB-aligned interior of the buffer is marked.
void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (out.nbytes() < 2 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(out.const_data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + out.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)out;
#endif
}

// A unit of parallel work: rows [row_begin, row_end) of one tensor.
struct Task {
  int64_t tensor;  // its descriptor
  int64_t row_begin;
  int64_t row_end;
};

// ~64 KiB per task: large enough to amortise scheduling, small enough to balance two cores on a
// single big matrix.
constexpr int64_t kTaskBytes = 1 << 16;
constexpr int64_t kStreamBytes = int64_t{16} << 20;  // non-temporal stores from here on

// int32 copies of last-axis indices, one per distinct index (std::list: stable addresses).
class Index32Cache {
 public:
  const int32_t* of(const int64_t* index, int64_t n) {
    for (const auto& [from, to] : copies_) {
      if (from == index && static_cast<int64_t>(to.size()) == n) return to.data();
    }
    return copies_.emplace_back(index, std::vector<int32_t>(index, index + n)).second.data();
  }

 private:
  std::list<std::pair<const int64_t*, std::vector<int32_t>>> copies_;
};

// How the rows of one coalesced tensor are produced (see RowKind).
RowPlan plan_rows(const PermuteTensorDesc& d, int64_t nbytes, Index32Cache& index32) {
  const int last = d.ndim - 1;
  const int64_t inner = d.sizes[last];
  RowPlan p{};
  if (d.ndim >= 2 && !d.index[last] && d.src_strides[last] == 1 && inner < 64) {
    p.kind = RowKind::kBlocks;
    p.lead = d.ndim - 2;
    p.row_len = d.sizes[p.lead] * inner;
    p.prefetch = d.src_strides[p.lead] == inner;
    return p;
  }
  p.lead = last;
  p.row_len = inner;
  if (d.index[last] && d.src_strides[last] == 1 && d.ndim > 1 &&
      inner <= std::numeric_limits<int32_t>::max()) {
    // 32-bit source offsets: half the index bytes, so index + row stay cache-resident.
    p.kind = RowKind::kGather32;
    p.index32 = index32.of(d.index[last], inner);
    p.stream = nbytes >= kStreamBytes;
  } else if (d.index[last]) {
    p.kind = RowKind::kGather64;
  } else {
    p.kind = d.src_strides[last] == 1 ? RowKind::kCopy : RowKind::kStrided;
  }
  return p;
}

// Everything the parallel pass needs: one descriptor and row plan per tensor the pass writes, and
// its rows cut into tasks laid end to end by output byte.
struct PermutePlan {
  std::vector<PermuteTensorDesc> descs;
  std::vector<RowPlan> rows;
  std::vector<Task> tasks;
  std::vector<int64_t> task_start;  // first byte of each task in the concatenated output
  int64_t total_bytes = 0;
  std::vector<int64_t> desc_of;     // tensor -> its descriptor; kCopied / kStaged: see below
  Index32Cache index32;
};
constexpr int64_t kCopied = -1;  // empty or 0-d: no pass needed
constexpr int64_t kStaged = -2;  // too deep for one pass: permute_in_stages

PermutePlan plan_permute_multi(at::TensorList tensors,
                               const std::vector<std::vector<at::Tensor>>& per_tensor) {
  PermutePlan plan;
  plan.descs.reserve(tensors.size());
  plan.rows.reserve(tensors.size());
  plan.desc_of.assign(tensors.size(), kCopied);
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& x = tensors[t];
    if (x.numel() == 0 || x.dim() == 0) continue;
    PermuteTensorDesc d;
    if (!coalesced_desc(x, per_tensor[t], d)) {
      plan.desc_of[t] = kStaged;
      continue;
    }
    const RowPlan p = plan_rows(d, x.nbytes(), plan.index32);
    const int64_t row_bytes = p.row_len * x.element_size();
    const int64_t rows = x.numel() / p.row_len;
    const int64_t rows_per_task = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, row_bytes));
    const int64_t id = static_cast<int64_t>(plan.descs.size());
    plan.desc_of[t] = id;
    plan.descs.push_back(d);
    plan.rows.push_back(p);
    for (int64_t r = 0; r < rows; r += rows_per_task) {
      const int64_t e = std::min(rows, r + rows_per_task);
      plan.tasks.push_back({id, r, e});
      plan.task_start.push_back(plan.total_bytes);
      plan.total_bytes += (e - r) * row_bytes;
    }
  }
  return plan;
}

// Outputs last and back to back, after every temporary of the plan: the same allocation pattern
// as clone() of the dict, so that the allocator can reuse freed memory the same way.
std::vector<at::Tensor> allocate_outputs(at::TensorList tensors, PermutePlan& plan) {
  static const bool use_huge_pages = [] {
    const char* v = std::getenv("PYREBASIN_NO_HUGEPAGES");
    return v == nullptr || v[0] == '\0' || v[0] == '0';
  }();
  std::vector<at::Tensor> outputs;
  outputs.reserve(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& x = tensors[t];
    if (plan.desc_of[t] == kStaged) {
      outputs.emplace_back();  // filled by permute_in_stages
      continue;
    }
    auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (plan.desc_of[t] >= 0) {
      if (use_huge_pages) advise_huge_pages(out);
      plan.descs[plan.desc_of[t]].dst = static_cast<char*>(out.mutable_data_ptr());
    } else if (x.dim() == 0) {
      out.copy_(x);
    }
    outputs.push_back(std::move(out));
  }
  return outputs;
}

// Split by bytes, not by task count: each thread takes the tasks that start in its byte range, so
// many small tensors and one huge one balance alike.
void run_plan(const PermutePlan& plan) {
  if (plan.tasks.empty()) return;
  const auto& starts = plan.task_start;
  at::parallel_for(0, plan.total_bytes, kTaskBytes, [&](int64_t begin, int64_t end) {
    auto i = std::lower_bound(starts.begin(), starts.end(), begin) - starts.begin();
    for (; i < static_cast<int64_t>(plan.tasks.size()) && starts[i] < end; ++i) {
      const Task& task = plan.tasks[i];
      run_rows(plan.descs[task.tensor], plan.rows[task.tensor], task.row_begin, task.row_end);
    }
  });
}

}  // namespace

std::vector<at::Tensor> permute_multi_cpu(at::TensorList tensors, at::TensorList indices,
                                          at::IntArrayRef owners, at::IntArrayRef axes) {
  const auto per_tensor = check_permute_multi_args(tensors, indices, owners, axes, c10::kCPU);
  PermutePlan plan = plan_permute_multi(tensors, per_tensor);
  auto outputs = allocate_outputs(tensors, plan);
  run_plan(plan);
  for (size_t t = 0; t < tensors.size(); ++t) {
    if (plan.desc_of[t] == kStaged) {
      outputs[t] = permute_in_stages(tensors[t], per_tensor[t], permute_multi_cpu);
    }
  }
  return outputs;
}

TORCH_LIBRARY_IMPL(pyrebasin, CPU, m) { m.impl("permute_multi", &permute_multi_cpu); }

}  // namespace pyrebasin
