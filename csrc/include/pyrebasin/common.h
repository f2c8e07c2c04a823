// What every native op shares, CPU and CUDA alike: the dtype tags of kernel descriptors, the 16-byte
// element type, and the launch configuration of grid-strided CUDA kernels. Free of torch headers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PRB_HD __host__ __device__ __forceinline__
#else
#define PRB_HD inline
#endif

namespace pyrebasin {

// Floating dtype of a tensor a kernel reads; the bindings set it with dtype_tag (checks.h).
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// A 16-byte element (complex128), moved as one aligned block.
struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

// Threads per block of the one-dimensional grid-strided launches.
constexpr int kThreadsPerBlock = 256;

// Most blocks worth launching: `blocks_per_sm` per multiprocessor (80 SMs when the count is unknown);
// a grid-strided kernel covers any amount of work with that many.
PRB_HD int64_t grid_cap(int sm_count, int blocks_per_sm) {
  return static_cast<int64_t>(sm_count > 0 ? sm_count : 80) * blocks_per_sm;
}

// Blocks of kThreadsPerBlock threads for `work` items, one item per thread, at most grid_cap.
PRB_HD int grid_blocks(int64_t work, int sm_count, int blocks_per_sm = 32) {
  const int64_t wanted = (work + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const int64_t cap = grid_cap(sm_count, blocks_per_sm);
  return static_cast<int>(wanted < cap ? wanted : cap);
}

}  // namespace pyrebasin
