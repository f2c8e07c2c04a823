// Plain-C description of one tensor for the multi-tensor permutation kernels (CPU and CUDA).
// Kept free of torch headers so that .cu files can include it.
#pragma once
#include <cstdint>

#include "pyrebasin/common.h"

namespace pyrebasin {

constexpr int kMaxPermuteDims = 8;

struct PermuteTensorDesc {
  const char* src;                            // input data (any strides)
  char* dst;                                  // contiguous output of the same shape
  int64_t numel;
  int64_t sizes[kMaxPermuteDims];
  int64_t src_strides[kMaxPermuteDims];       // in elements
  const int64_t* index[kMaxPermuteDims];      // nullptr: axis not permuted
  int32_t ndim;
  int32_t elem_size;                          // bytes: 1, 2, 4, 8 or 16
};

}  // namespace pyrebasin
