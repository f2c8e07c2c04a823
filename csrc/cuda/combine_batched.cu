// CUDA kernel of pyrebasin::combine_batched: one launch for all tensors of a state dict and all K
// samples. Each thread writes a span of kCombineSpan consecutive elements of one tensor for one sample,
// drawing lambda in-register (philox.h): consecutive element coefficients share one Philox call.
// No torch headers here (see DEVELOPERS.md): combine_batched_binding.cpp checks the arguments,
// builds the descriptors and calls combine_batched_cuda_launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pyrebasin/combine_batched.h"

namespace pyrebasin {
namespace {

// 16-bit element types for combine_span's static_casts: torch builds .cu files with
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, so __half and __nv_bfloat16
// convert to and from float only through the intrinsics (round-to-nearest-even, as c10::Half and
// c10::BFloat16 do).
struct Half {
  __half x;
  Half() = default;
  __host__ __device__ explicit Half(float v) : x(__float2half_rn(v)) {}
  __host__ __device__ explicit operator float() const { return __half2float(x); }
};
struct BFloat16 {
  __nv_bfloat16 x;
  BFloat16() = default;
  __host__ __device__ explicit BFloat16(float v) : x(__float2bfloat16_rn(v)) {}
  __host__ __device__ explicit operator float() const { return __bfloat162float(x); }
};
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit element wrappers");

// span_offsets[t] is the first global span of tensor t (exclusive prefix sum over
// ceil(numel / kCombineSpan)); spans_per_sample = span_offsets[n_tensors].
__global__ void combine_batched_kernel(const CombineTensorDesc* __restrict__ descs,
                                       const int64_t* __restrict__ span_offsets, int64_t n_tensors,
                                       int64_t spans_per_sample, int64_t total, CombineParams p) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += stride) {
    const int64_t k = g / spans_per_sample;
    const int64_t s = g - k * spans_per_sample;
    int64_t lo = 0, hi = n_tensors - 1;
    while (lo < hi) {  // last t with span_offsets[t] <= s
      const int64_t mid = (lo + hi + 1) >> 1;
      if (span_offsets[mid] <= s) lo = mid; else hi = mid - 1;
    }
    const CombineTensorDesc& d = descs[lo];
    const int64_t e0 = (s - span_offsets[lo]) * kCombineSpan;
    const int64_t e1 = e0 + kCombineSpan < d.numel ? e0 + kCombineSpan : d.numel;
    switch (d.dtype) {
      case DType::kFloat32: combine_span<float, float>(d, p, k, e0, e1); break;
      case DType::kFloat64: combine_span<double, double>(d, p, k, e0, e1); break;
      case DType::kFloat16: combine_span<Half, float>(d, p, k, e0, e1); break;
      case DType::kBFloat16: combine_span<BFloat16, float>(d, p, k, e0, e1); break;
    }
  }
}

}  // namespace

// descs and span_offsets live in device memory; returns the launch status (checked by the binding).
cudaError_t combine_batched_cuda_launch(const CombineTensorDesc* descs, const int64_t* span_offsets,
                                        int64_t n_tensors, int64_t spans_per_sample,
                                        int64_t num_samples, const CombineParams& params,
                                        int sm_count, cudaStream_t stream) {
  const int64_t total = spans_per_sample * num_samples;
  if (total == 0 || n_tensors == 0) return cudaSuccess;
  combine_batched_kernel<<<grid_blocks(total, sm_count), kThreadsPerBlock, 0, stream>>>(
      descs, span_offsets, n_tensors, spans_per_sample, total, params);
  return cudaGetLastError();
}

}  // namespace pyrebasin
