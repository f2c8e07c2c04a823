// CUDA binding of pyrebasin::corr_accumulate: checks, then per chunk one pack launch per stream
// (float64 buffer + Σx, Σx²) and one cuBLAS float64 GEMM (at::addmm_) for Σxyᵀ, all on the current
// stream. Compiled only when torch has CUDA (see setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "pyrebasin/corr_accumulate.h"
#include "pyrebasin/corr_accumulate_checks.h"

namespace pyrebasin {

cudaError_t corr_accumulate_pack_cuda_launch(const CorrStreamDesc& d, int64_t s0, int64_t k,
                                             double* buf, double* sum, double* sum_sq, int sm_count,
                                             cudaStream_t stream);

void corr_accumulate_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y,
                          int64_t channel_dim, at::Tensor count, at::Tensor sum_x, at::Tensor sum_y,
                          at::Tensor sum_xx, at::Tensor sum_yy, at::Tensor sum_xy) {
  at::Tensor keep_x, keep_y;
  const auto [dx, dy] = check_corr_accumulate_args(x, y, channel_dim, count, sum_x, sum_y, sum_xx,
                                                   sum_yy, sum_xy, c10::kCUDA, keep_x, keep_y);
  const int64_t samples = dx.outer * dx.inner;
  if (samples == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sm = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool two = y.has_value();
  // Larger chunks than on the CPU: the GEMM wants long K, and device memory is the limit here.
  const int64_t chunk =
      std::min(samples, corr_chunk_samples(dx, two ? dy : CorrStreamDesc{}, int64_t(256) << 20));
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor bx = at::empty({chunk * dx.channels}, f64);
  at::Tensor by = two ? at::empty({chunk * dy.channels}, f64) : at::Tensor();
  // The kernels add into these fresh [2, C] moments, which then go to both accumulators when y is x.
  at::Tensor mx = at::zeros({2, dx.channels}, f64);
  at::Tensor my = two ? at::zeros({2, dy.channels}, f64) : mx;
  for (int64_t s0 = 0; s0 < samples; s0 += chunk) {
    const int64_t k = std::min(chunk, samples - s0);
    C10_CUDA_CHECK(corr_accumulate_pack_cuda_launch(dx, s0, k, bx.data_ptr<double>(),
                                                    mx[0].data_ptr<double>(),
                                                    mx[1].data_ptr<double>(), sm, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto X = samples_by_channels(bx, dx, k);
    if (two) {
      C10_CUDA_CHECK(corr_accumulate_pack_cuda_launch(dy, s0, k, by.data_ptr<double>(),
                                                      my[0].data_ptr<double>(),
                                                      my[1].data_ptr<double>(), sm, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_xy.addmm_(X.t(), samples_by_channels(by, dy, k));
    } else {
      sum_xy.addmm_(X.t(), X);
    }
  }
  sum_x.add_(mx[0]);
  sum_xx.add_(mx[1]);
  sum_y.add_(my[0]);
  sum_yy.add_(my[1]);
  count.add_(static_cast<double>(samples));
}

TORCH_LIBRARY_IMPL(pyrebasin, CUDA, m) { m.impl("corr_accumulate", &corr_accumulate_cuda); }

}  // namespace pyrebasin
