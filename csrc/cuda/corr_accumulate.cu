// CUDA pack kernels of pyrebasin::corr_accumulate: one chunk of an activation stream converted to a
// float64 buffer (rows [k, C] or cols [C, k] layout, see corr_accumulate.h), fused with Σx and Σx².
// No torch headers here: the binding (corr_accumulate_binding.cpp) checks the arguments, calls
// corr_accumulate_pack_cuda_launch per stream and chunk, then cuBLAS (at::addmm_) for Σxyᵀ.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pyrebasin/corr_accumulate.h"

namespace pyrebasin {
namespace {

__device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}

constexpr int kTileC = 32;  // channels per block (threadIdx.x in the rows layout)
constexpr int kRowsY = 8;   // threadIdx.y

// Rows layout (inner == 1): threadIdx.x walks channels (coalesced), threadIdx.y and the grid's y walk
// samples; block-level reduction in shared memory, one atomicAdd per channel and block.
template <typename T>
__global__ void corr_pack_rows_kernel(CorrStreamDesc d, int64_t s0, int64_t k, double* __restrict__ buf,
                                      double* __restrict__ sum, double* __restrict__ sum_sq) {
  __shared__ double s_sum[kRowsY][kTileC];
  __shared__ double s_sq[kRowsY][kTileC];
  const T* x = static_cast<const T*>(d.data);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + threadIdx.x;
  double acc = 0, acc2 = 0;
  if (c < d.channels) {
    for (int64_t kk = static_cast<int64_t>(blockIdx.y) * kRowsY + threadIdx.y; kk < k;
         kk += static_cast<int64_t>(gridDim.y) * kRowsY) {
      const double v = to_double(x[(s0 + kk) * d.s_outer + c * d.s_channel]);
      buf[kk * d.channels + c] = v;
      acc += v;
      acc2 += v * v;
    }
  }
  s_sum[threadIdx.y][threadIdx.x] = acc;
  s_sq[threadIdx.y][threadIdx.x] = acc2;
  __syncthreads();
  if (threadIdx.y == 0 && c < d.channels) {
    for (int r = 1; r < kRowsY; ++r) {
      acc += s_sum[r][threadIdx.x];
      acc2 += s_sq[r][threadIdx.x];
    }
    atomicAdd(sum + c, acc);
    atomicAdd(sum_sq + c, acc2);
  }
}

// Cols layout (inner > 1): one channel per blockIdx.y (grid-strided), threads walk that channel's
// samples (contiguous positions of a conv map: coalesced reads and writes); warp-shuffle reduction.
template <typename T>
__global__ void corr_pack_cols_kernel(CorrStreamDesc d, int64_t s0, int64_t k, double* __restrict__ buf,
                                      double* __restrict__ sum, double* __restrict__ sum_sq) {
  __shared__ double s_sum[32];
  __shared__ double s_sq[32];
  const T* x = static_cast<const T*>(d.data);
  for (int64_t c = blockIdx.y; c < d.channels; c += gridDim.y) {
    double acc = 0, acc2 = 0;
    for (int64_t kk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; kk < k;
         kk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t s = s0 + kk;
      const int64_t o = s / d.inner, i = s - o * d.inner;
      const double v = to_double(x[o * d.s_outer + c * d.s_channel + i * d.s_inner]);
      buf[c * k + kk] = v;
      acc += v;
      acc2 += v * v;
    }
    for (int off = 16; off > 0; off >>= 1) {
      acc += __shfl_down_sync(0xffffffffu, acc, off);
      acc2 += __shfl_down_sync(0xffffffffu, acc2, off);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
      s_sum[warp] = acc;
      s_sq[warp] = acc2;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) {
        acc += s_sum[w];
        acc2 += s_sq[w];
      }
      atomicAdd(sum + c, acc);
      atomicAdd(sum_sq + c, acc2);
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch_typed(const CorrStreamDesc& d, int64_t s0, int64_t k, double* buf, double* sum,
                         double* sum_sq, int sm_count, cudaStream_t stream) {
  const int64_t cap = grid_cap(sm_count, 8);
  if (corr_rows_layout(d)) {
    const int64_t tiles = (d.channels + kTileC - 1) / kTileC;
    int64_t ys = (k + kRowsY - 1) / kRowsY;
    const int64_t want_y = cap / (tiles > 0 ? tiles : 1);
    ys = ys < want_y ? ys : (want_y > 0 ? want_y : 1);
    ys = ys < 65535 ? ys : 65535;
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ys));
    corr_pack_rows_kernel<T><<<grid, dim3(kTileC, kRowsY), 0, stream>>>(d, s0, k, buf, sum, sum_sq);
  } else {
    int64_t xs = (k + kThreadsPerBlock - 1) / kThreadsPerBlock;
    const int64_t want_x = cap / (d.channels > 0 ? d.channels : 1);
    xs = xs < want_x ? xs : (want_x > 0 ? want_x : 1);
    const int64_t ys = d.channels < 65535 ? d.channels : 65535;
    const dim3 grid(static_cast<unsigned>(xs), static_cast<unsigned>(ys));
    corr_pack_cols_kernel<T><<<grid, kThreadsPerBlock, 0, stream>>>(d, s0, k, buf, sum, sum_sq);
  }
  return cudaGetLastError();
}

}  // namespace

// Packs samples [s0, s0 + k) of stream d into buf (device, float64) and adds their Σx, Σx² into
// sum/sum_sq (device, float64, length C). Returns the launch status (checked by the binding).
cudaError_t corr_accumulate_pack_cuda_launch(const CorrStreamDesc& d, int64_t s0, int64_t k,
                                             double* buf, double* sum, double* sum_sq, int sm_count,
                                             cudaStream_t stream) {
  if (k == 0 || d.channels == 0) return cudaSuccess;
  switch (d.dtype) {
    case DType::kFloat32: return launch_typed<float>(d, s0, k, buf, sum, sum_sq, sm_count, stream);
    case DType::kFloat64: return launch_typed<double>(d, s0, k, buf, sum, sum_sq, sm_count, stream);
    case DType::kFloat16: return launch_typed<__half>(d, s0, k, buf, sum, sum_sq, sm_count, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(d, s0, k, buf, sum, sum_sq, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyrebasin
