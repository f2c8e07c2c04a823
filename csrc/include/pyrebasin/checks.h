// Torch-side helpers shared by every <op>_checks.h: the dtype tag of a tensor a kernel reads, with
// the caller error naming the op, the argument and the dtype it got.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "pyrebasin/common.h"

namespace pyrebasin {

// `op` and `name` make the message: "<op>: <name> must have dtype float32, ..., got <dtype>".
inline DType dtype_tag(const at::Tensor& t, const char* op, const std::string& name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must have dtype float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

}  // namespace pyrebasin
