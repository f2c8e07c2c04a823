// Argument checks and descriptor building shared by the CPU and CUDA bindings of combine_batched:
// caller errors name the offending tensor and value, so bad input never reaches a kernel.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "pyrebasin/checks.h"
#include "pyrebasin/combine_batched.h"

namespace pyrebasin {

inline int32_t combine_distribution_code(const std::string& name, at::ArrayRef<double> params) {
  struct Entry {
    const char* name;
    int32_t code;
    size_t n_params;
  };
  static const Entry entries[] = {{"constant", rng::kConstant, 1}, {"uniform", rng::kUniform, 2},
                                  {"bernoulli", rng::kBernoulli, 1}, {"gaussian", rng::kGaussian, 4},
                                  {"beta", rng::kBeta, 2}};
  for (const auto& e : entries) {
    if (name == e.name) {
      TORCH_CHECK(params.size() == e.n_params, "combine_batched: distribution '", name, "' takes ",
                  e.n_params, " params, got ", params.size());
      if (e.code == rng::kBeta) {
        TORCH_CHECK(params[0] > 0 && params[1] > 0 && std::isfinite(params[0]) &&
                        std::isfinite(params[1]),
                    "combine_batched: beta(alpha, beta) needs finite alpha, beta > 0, got (",
                    params[0], ", ", params[1], ")");
      }
      if (e.code == rng::kGaussian) {
        TORCH_CHECK(params[1] >= 0, "combine_batched: gaussian std must be >= 0, got ", params[1]);
      }
      return e.code;
    }
  }
  TORCH_CHECK(false, "combine_batched: unknown distribution '", name,
              "'; expected constant, uniform, bernoulli, gaussian or beta");
}

// Checks every argument, allocates the outputs [num_samples, *shape] and fills the descriptors.
// `keep` holds the contiguous copies of non-contiguous inputs alive while the kernel runs.
inline std::vector<at::Tensor> prepare_combine_batched(
    at::TensorList a, at::TensorList b, at::IntArrayRef coef_base, at::IntArrayRef coef_div,
    at::IntArrayRef coef_mod, const std::string& distribution, at::ArrayRef<double> params,
    int64_t seed, int64_t sample_begin, int64_t num_samples, c10::DeviceType device_type,
    std::vector<CombineTensorDesc>& descs, CombineParams& cp, std::vector<at::Tensor>& keep) {
  const size_t n = a.size();
  TORCH_CHECK(b.size() == n && coef_base.size() == n && coef_div.size() == n &&
                  coef_mod.size() == n,
              "combine_batched: a, b, coef_base, coef_div and coef_mod must have the same length, "
              "got ", n, ", ", b.size(), ", ", coef_base.size(), ", ", coef_div.size(), " and ",
              coef_mod.size());
  TORCH_CHECK(num_samples >= 0, "combine_batched: num_samples must be >= 0, got ", num_samples);
  TORCH_CHECK(sample_begin >= 0 && sample_begin + num_samples <= (int64_t{1} << 32),
              "combine_batched: samples [", sample_begin, ", ", sample_begin + num_samples,
              ") must lie in [0, 2^32)");
  cp = CombineParams{};
  cp.dist = combine_distribution_code(distribution, params);
  for (size_t j = 0; j < params.size() && j < 4; ++j) cp.params[j] = params[j];
  cp.seed = static_cast<uint64_t>(seed);
  cp.sample_begin = sample_begin;
  std::vector<at::Tensor> outputs;
  outputs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& x = a[i];
    const auto& y = b[i];
    TORCH_CHECK(x.device().type() == device_type && y.device() == x.device(),
                "combine_batched: a[", i, "] is on ", x.device(), " and b[", i, "] on ",
                y.device(), "; this kernel runs on ", c10::DeviceTypeName(device_type));
    TORCH_CHECK(x.sizes() == y.sizes(), "combine_batched: a[", i, "] has shape ", x.sizes(),
                " but b[", i, "] has shape ", y.sizes());
    TORCH_CHECK(x.scalar_type() == y.scalar_type(), "combine_batched: a[", i, "] is ",
                x.scalar_type(), " but b[", i, "] is ", y.scalar_type());
    const DType dtype = dtype_tag(x, "combine_batched", "a[" + std::to_string(i) + "]");
    TORCH_CHECK(coef_div[i] >= 1 && coef_mod[i] >= 1 && coef_base[i] >= 0,
                "combine_batched: tensor ", i, " has coef_base=", coef_base[i], ", coef_div=",
                coef_div[i], ", coef_mod=", coef_mod[i], "; expected base >= 0, div >= 1, mod >= 1");
    std::vector<int64_t> shape{num_samples};
    shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
    auto out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
    outputs.push_back(out);
    if (x.numel() == 0 || num_samples == 0) continue;
    auto xc = x.contiguous();
    auto yc = y.contiguous();
    keep.push_back(xc);
    keep.push_back(yc);
    CombineTensorDesc d{};
    d.a = xc.const_data_ptr();
    d.b = yc.const_data_ptr();
    d.out = out.mutable_data_ptr();
    d.numel = x.numel();
    d.coef_base = coef_base[i];
    d.coef_div = coef_div[i];
    d.coef_mod = coef_mod[i];
    d.dtype = dtype;
    descs.push_back(d);
  }
  return outputs;
}

}  // namespace pyrebasin
