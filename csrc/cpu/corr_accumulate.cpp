// CPU kernel of pyrebasin::corr_accumulate: streaming count, Σx, Σy, Σx², Σy² and Σxyᵀ in float64.
// Per chunk of samples one parallel pass packs each stream into a float64 buffer (conversion fused
// with the first and second moments), then the vendor BLAS does Σxyᵀ += XᵀY (at::addmm_).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "pyrebasin/corr_accumulate.h"
#include "pyrebasin/corr_accumulate_checks.h"

namespace pyrebasin {
namespace {

constexpr int64_t kSampleBlock = 1024;  // samples per task: partial sums stay exact enough in double
constexpr int64_t kChannelBlock = 128;  // channels per task: a cache-friendly strip of the buffer

// One task of the rows layout (inner == 1: sample s = outer index, channels contiguous in buf):
// samples [k0, k1) x channels [c0, c1), partial moments into ps/pq.
template <typename T>
void pack_rows_task(const CorrStreamDesc& d, int64_t s0, int64_t k0, int64_t k1, int64_t c0,
                    int64_t c1, double* buf, double* ps, double* pq) {
  const T* x = static_cast<const T*>(d.data);
  const int64_t C = d.channels;
  double acc[kChannelBlock] = {0}, acc2[kChannelBlock] = {0};
  const int64_t w = c1 - c0;
  for (int64_t kk = k0; kk < k1; ++kk) {
    const T* __restrict__ src = x + (s0 + kk) * d.s_outer + c0 * d.s_channel;
    double* __restrict__ dst = buf + kk * C + c0;
    if (d.s_channel == 1) {  // contiguous features: a vectorisable convert-and-sum
      for (int64_t c = 0; c < w; ++c) {
        const double v = static_cast<double>(src[c]);
        dst[c] = v;
        acc[c] += v;
        acc2[c] += v * v;
      }
    } else {
      for (int64_t c = 0; c < w; ++c) {
        const double v = static_cast<double>(src[c * d.s_channel]);
        dst[c] = v;
        acc[c] += v;
        acc2[c] += v * v;
      }
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    ps[c] = acc[c - c0];
    pq[c] = acc2[c - c0];
  }
}

// One task of the cols layout (sample s = o * inner + i; each channel's samples contiguous in buf,
// k of them per channel): samples [k0, k1) x channels [c0, c1), partial moments into ps/pq.
template <typename T>
void pack_cols_task(const CorrStreamDesc& d, int64_t s0, int64_t k, int64_t k0, int64_t k1,
                    int64_t c0, int64_t c1, double* buf, double* ps, double* pq) {
  const T* x = static_cast<const T*>(d.data);
  for (int64_t c = c0; c < c1; ++c) {
    double acc = 0, acc2 = 0;
    double* dst = buf + c * k;
    int64_t o = (s0 + k0) / d.inner, i = (s0 + k0) % d.inner;
    for (int64_t kk = k0; kk < k1;) {
      // one run of positions inside outer row o
      const int64_t run = std::min(k1 - kk, d.inner - i);
      const T* src = x + o * d.s_outer + c * d.s_channel + i * d.s_inner;
      if (d.s_inner == 1) {
        for (int64_t r = 0; r < run; ++r) {
          const double v = static_cast<double>(src[r]);
          dst[kk + r] = v;
          acc += v;
          acc2 += v * v;
        }
      } else {
        for (int64_t r = 0; r < run; ++r) {
          const double v = static_cast<double>(src[r * d.s_inner]);
          dst[kk + r] = v;
          acc += v;
          acc2 += v * v;
        }
      }
      kk += run;
      i = 0;
      ++o;
    }
    ps[c] = acc;
    pq[c] = acc2;
  }
}

// Packs samples [s0, s0 + k) of one stream into buf ([k, C] rows or [C, k] cols layout) and writes
// per-task partial moments into partial[sample_block][c] (disjoint slots: no atomics).
template <typename T>
void pack_stream(const CorrStreamDesc& d, int64_t s0, int64_t k, double* buf, double* part_sum,
                 double* part_sq) {
  const int64_t C = d.channels;
  const int64_t n_sb = (k + kSampleBlock - 1) / kSampleBlock;
  const int64_t n_cb = (C + kChannelBlock - 1) / kChannelBlock;
  const bool rows = corr_rows_layout(d);
  at::parallel_for(0, n_sb * n_cb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sb = task / n_cb, cb = task % n_cb;
      const int64_t k0 = sb * kSampleBlock, k1 = std::min(k, k0 + kSampleBlock);
      const int64_t c0 = cb * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
      if (rows) {
        pack_rows_task<T>(d, s0, k0, k1, c0, c1, buf, part_sum + sb * C, part_sq + sb * C);
      } else {
        pack_cols_task<T>(d, s0, k, k0, k1, c0, c1, buf, part_sum + sb * C, part_sq + sb * C);
      }
    }
  });
}

void pack_dispatch(const CorrStreamDesc& d, int64_t s0, int64_t k, double* buf, double* ps,
                   double* pq) {
  switch (d.dtype) {
    case DType::kFloat32: return pack_stream<float>(d, s0, k, buf, ps, pq);
    case DType::kFloat64: return pack_stream<double>(d, s0, k, buf, ps, pq);
    case DType::kFloat16: return pack_stream<c10::Half>(d, s0, k, buf, ps, pq);
    case DType::kBFloat16: return pack_stream<c10::BFloat16>(d, s0, k, buf, ps, pq);
  }
  TORCH_INTERNAL_ASSERT(false, "corr_accumulate: unknown dtype");
}

}  // namespace

void corr_accumulate_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y,
                         int64_t channel_dim, at::Tensor count, at::Tensor sum_x, at::Tensor sum_y,
                         at::Tensor sum_xx, at::Tensor sum_yy, at::Tensor sum_xy) {
  at::Tensor keep_x, keep_y;
  const auto [dx, dy] = check_corr_accumulate_args(x, y, channel_dim, count, sum_x, sum_y, sum_xx,
                                                   sum_yy, sum_xy, c10::kCPU, keep_x, keep_y);
  const int64_t samples = dx.outer * dx.inner;
  if (samples == 0) return;
  const bool two = y.has_value();
  const int64_t chunk = std::min(samples, corr_chunk_samples(dx, two ? dy : CorrStreamDesc{}));
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t n_sb = (chunk + kSampleBlock - 1) / kSampleBlock;
  at::Tensor bx = at::empty({chunk * dx.channels}, f64);
  at::Tensor px = at::empty({2, n_sb, dx.channels}, f64);
  at::Tensor by, py;
  if (two) {
    by = at::empty({chunk * dy.channels}, f64);
    py = at::empty({2, n_sb, dy.channels}, f64);
  }
  for (int64_t s0 = 0; s0 < samples; s0 += chunk) {
    const int64_t k = std::min(chunk, samples - s0);
    const int64_t blocks = (k + kSampleBlock - 1) / kSampleBlock;
    pack_dispatch(dx, s0, k, bx.data_ptr<double>(), px[0].data_ptr<double>(),
                  px[1].data_ptr<double>());
    const auto mx = px.narrow(1, 0, blocks).sum(1);  // [2, C]: Σx, Σx² of this chunk
    sum_x.add_(mx[0]);
    sum_xx.add_(mx[1]);
    const auto X = samples_by_channels(bx, dx, k);
    if (two) {
      pack_dispatch(dy, s0, k, by.data_ptr<double>(), py[0].data_ptr<double>(),
                    py[1].data_ptr<double>());
      const auto my = py.narrow(1, 0, blocks).sum(1);
      sum_y.add_(my[0]);
      sum_yy.add_(my[1]);
      sum_xy.addmm_(X.t(), samples_by_channels(by, dy, k));
    } else {
      sum_y.add_(mx[0]);
      sum_yy.add_(mx[1]);
      sum_xy.addmm_(X.t(), X);
    }
  }
  count.add_(static_cast<double>(samples));
}

TORCH_LIBRARY_IMPL(pyrebasin, CPU, m) { m.impl("corr_accumulate", &corr_accumulate_cpu); }

}  // namespace pyrebasin
