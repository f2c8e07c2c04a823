// Argument checks shared by the CPU and CUDA bindings of corr_accumulate: caller errors name the
// tensor and the expected shape, so a mismatch never reaches a kernel.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "pyrebasin/checks.h"
#include "pyrebasin/corr_accumulate.h"

namespace pyrebasin {

// [outer, C, inner] view of a stream (a view when the strides allow it, else a copy).
inline CorrStreamDesc corr_stream_desc(const at::Tensor& t, int64_t channel_dim, at::Tensor& keep,
                                       const char* name) {
  TORCH_CHECK(t.dim() >= 1, "corr_accumulate: ", name, " must have at least one dim, got a scalar");
  const int64_t cd = channel_dim < 0 ? channel_dim + t.dim() : channel_dim;
  TORCH_CHECK(cd >= 0 && cd < t.dim(), "corr_accumulate: channel_dim ", channel_dim,
              " is out of range for ", name, " of shape ", t.sizes());
  int64_t outer = 1, inner = 1;
  for (int64_t a = 0; a < cd; ++a) outer *= t.size(a);
  for (int64_t a = cd + 1; a < t.dim(); ++a) inner *= t.size(a);
  keep = t.reshape({outer, t.size(cd), inner});
  CorrStreamDesc d{};
  d.data = keep.const_data_ptr();
  d.dtype = dtype_tag(t, "corr_accumulate", name);
  d.outer = outer;
  d.channels = t.size(cd);
  d.inner = inner;
  d.s_outer = keep.stride(0);
  d.s_channel = keep.stride(1);
  d.s_inner = keep.stride(2);
  return d;
}

inline void check_accumulator(const at::Tensor& acc, at::IntArrayRef shape, const at::Tensor& x,
                              const char* name) {
  TORCH_CHECK(acc.scalar_type() == at::kDouble, "corr_accumulate: ", name,
              " must be a float64 accumulator, got ", acc.scalar_type());
  TORCH_CHECK(acc.sizes() == shape, "corr_accumulate: ", name, " must have shape ", shape,
              ", got ", acc.sizes());
  TORCH_CHECK(acc.device() == x.device(), "corr_accumulate: ", name, " is on ", acc.device(),
              " but x is on ", x.device());
  TORCH_CHECK(acc.is_contiguous(), "corr_accumulate: ", name, " must be contiguous");
}

// Validates everything and returns the stream descriptors (y's equals x's when y is absent).
inline std::pair<CorrStreamDesc, CorrStreamDesc> check_corr_accumulate_args(
    const at::Tensor& x, const std::optional<at::Tensor>& y, int64_t channel_dim,
    const at::Tensor& count, const at::Tensor& sum_x, const at::Tensor& sum_y,
    const at::Tensor& sum_xx, const at::Tensor& sum_yy, const at::Tensor& sum_xy,
    c10::DeviceType device_type, at::Tensor& keep_x, at::Tensor& keep_y) {
  TORCH_CHECK(x.device().type() == device_type, "corr_accumulate: x is on ", x.device(),
              " but this kernel runs on ", c10::DeviceTypeName(device_type));
  const auto dx = corr_stream_desc(x, channel_dim, keep_x, "x");
  auto dy = dx;
  if (y.has_value()) {
    const auto& yt = *y;
    TORCH_CHECK(yt.device() == x.device(), "corr_accumulate: y is on ", yt.device(),
                " but x is on ", x.device());
    TORCH_CHECK(yt.dim() == x.dim(), "corr_accumulate: x ", x.sizes(), " and y ", yt.sizes(),
                " must have the same rank");
    dy = corr_stream_desc(yt, channel_dim, keep_y, "y");
    TORCH_CHECK(dy.outer == dx.outer && dy.inner == dx.inner, "corr_accumulate: x ", x.sizes(),
                " and y ", yt.sizes(), " must agree on every dim except channel_dim ", channel_dim);
  }
  check_accumulator(count, {}, x, "count");
  check_accumulator(sum_x, {dx.channels}, x, "sum_x");
  check_accumulator(sum_xx, {dx.channels}, x, "sum_xx");
  check_accumulator(sum_y, {dy.channels}, x, "sum_y");
  check_accumulator(sum_yy, {dy.channels}, x, "sum_yy");
  check_accumulator(sum_xy, {dx.channels, dy.channels}, x, "sum_xy");
  return {dx, dy};
}

// Samples per chunk: both float64 pack buffers together stay near `budget` bytes.
inline int64_t corr_chunk_samples(const CorrStreamDesc& dx, const CorrStreamDesc& dy,
                                  int64_t budget = int64_t(32) << 20) {
  const int64_t per_sample = 8 * (dx.channels + dy.channels);
  int64_t k = budget / (per_sample > 0 ? per_sample : 1);
  return k < 256 ? 256 : k;
}

// The [k, C] matrix X of a packed chunk (a transposed view for the cols layout); CPU and CUDA share it.
inline at::Tensor samples_by_channels(const at::Tensor& flat, const CorrStreamDesc& d, int64_t k) {
  auto used = flat.narrow(0, 0, k * d.channels);
  return corr_rows_layout(d) ? used.view({k, d.channels}) : used.view({d.channels, k}).t();
}

}  // namespace pyrebasin
