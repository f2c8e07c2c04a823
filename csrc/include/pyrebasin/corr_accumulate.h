// Plain-C description of one activation stream for the correlation-accumulation pack kernels
// (CPU and CUDA): the stream is viewed as [outer, C, inner] (channel_dim in the middle) and every
// (outer, inner) position is a sample. Kept free of torch headers so that .cu files can include it.
#pragma once
#include <cstdint>

#include "pyrebasin/common.h"

namespace pyrebasin {

struct CorrStreamDesc {
  const void* data;
  DType dtype;
  int64_t outer, channels, inner;      // sizes of the [outer, C, inner] view
  int64_t s_outer, s_channel, s_inner; // its strides, in elements
};

// One chunk of samples [sample_begin, sample_begin + samples) packed into a float64 buffer:
// "rows" layout [samples, C] when inner == 1 (features already last), else "cols" layout
// [C, samples] (each channel's positions stay contiguous: no NHWC transpose of conv maps).
inline bool corr_rows_layout(const CorrStreamDesc& d) { return d.inner == 1; }

}  // namespace pyrebasin
