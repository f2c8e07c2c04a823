// CUDA kernel of pyrebasin::permute_multi: one launch for all tensors of a state dict. Each thread
// copies one element of one output, reading it through every permuted axis at once.
// No torch headers here (see DEVELOPERS.md): the binding in permute_multi_binding.cpp checks the
// arguments, builds the descriptors and calls permute_multi_cuda_launch.
#include <cuda_runtime.h>

#include <cstdint>

#include "pyrebasin/permute_multi.h"

namespace pyrebasin {
namespace {

template <typename elem_t>
__device__ __forceinline__ void copy_elem(const PermuteTensorDesc& d, int64_t src_off, int64_t i) {
  reinterpret_cast<elem_t*>(d.dst)[i] = reinterpret_cast<const elem_t*>(d.src)[src_off];
}

// offsets[t] is the first global element of tensor t (exclusive prefix sum, offsets[n] = total).
__global__ void permute_multi_kernel(const PermuteTensorDesc* __restrict__ descs,
                                     const int64_t* __restrict__ offsets, int64_t n_tensors,
                                     int64_t total) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += stride) {
    int64_t lo = 0, hi = n_tensors - 1;
    while (lo < hi) {  // last t with offsets[t] <= g
      const int64_t mid = (lo + hi + 1) >> 1;
      if (offsets[mid] <= g) lo = mid; else hi = mid - 1;
    }
    const PermuteTensorDesc& d = descs[lo];
    int64_t i = g - offsets[lo];
    int64_t rem = i, src_off = 0;
    for (int a = d.ndim - 1; a >= 0; --a) {
      const int64_t c = rem % d.sizes[a];
      rem /= d.sizes[a];
      const int64_t from = d.index[a] ? d.index[a][c] : c;
      src_off += from * d.src_strides[a];
    }
    switch (d.elem_size) {
      case 1: copy_elem<uint8_t>(d, src_off, i); break;
      case 2: copy_elem<uint16_t>(d, src_off, i); break;
      case 4: copy_elem<uint32_t>(d, src_off, i); break;
      case 8: copy_elem<uint64_t>(d, src_off, i); break;
      default: copy_elem<Bytes16>(d, src_off, i); break;
    }
  }
}

}  // namespace

// descs and offsets live in device memory; returns the launch status (checked by the binding).
cudaError_t permute_multi_cuda_launch(const PermuteTensorDesc* descs, const int64_t* offsets,
                                      int64_t n_tensors, int64_t total, int sm_count,
                                      cudaStream_t stream) {
  if (total == 0 || n_tensors == 0) return cudaSuccess;
  permute_multi_kernel<<<grid_blocks(total, sm_count), kThreadsPerBlock, 0, stream>>>(descs, offsets,
                                                                                  n_tensors, total);
  return cudaGetLastError();
}

}  // namespace pyrebasin
