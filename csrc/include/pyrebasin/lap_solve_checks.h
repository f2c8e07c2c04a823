// Argument checks of pyrebasin::lap_solve (CPU only: see csrc/ops.cpp): caller errors name the
// argument and quote the shape, dtype, device or value it got, so bad input never reaches the solver.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace pyrebasin {

// Every entry finite, checked in one plain pass over the contiguous cost the solver reads (a
// torch isfinite + all() costs more than a whole solve of an easy n = 2048 cost).
inline void check_lap_cost_finite(const double* cost, int64_t n) {
  for (int64_t i = 0; i < n * n; ++i) {
    TORCH_CHECK(std::isfinite(cost[i]), "lap_solve: cost has NaN or infinite entries (cost[", i / n,
                ", ", i % n, "] = ", cost[i], ")");
  }
}

// Returns the previous assignment of a warm start as a contiguous int64 tensor (undefined: cold).
inline at::Tensor check_lap_solve_args(const at::Tensor& cost, const std::optional<at::Tensor>& v,
                                       const std::optional<at::Tensor>& col4row) {
  TORCH_CHECK(cost.device().is_cpu(), "lap_solve: cost must be on the CPU, got ", cost.device());
  TORCH_CHECK(cost.scalar_type() == at::kDouble, "lap_solve: cost must be float64, got ",
              cost.scalar_type());
  TORCH_CHECK(cost.dim() == 2 && cost.size(0) == cost.size(1),
              "lap_solve: cost must be a square [n, n] matrix, got ", cost.sizes());
  TORCH_CHECK(v.has_value() == col4row.has_value(),
              "lap_solve: pass both v and col4row for a warm start, or neither");
  if (!v.has_value()) return at::Tensor();
  const int64_t n = cost.size(0);
  TORCH_CHECK(v->scalar_type() == at::kDouble && v->dim() == 1 && v->size(0) == n && v->device().is_cpu(),
              "lap_solve: v must be a float64 CPU tensor of shape [", n, "], got ", v->scalar_type(),
              " ", v->sizes(), " on ", v->device());
  TORCH_CHECK(col4row->scalar_type() == at::kLong && col4row->dim() == 1 && col4row->size(0) == n &&
                  col4row->device().is_cpu(),
              "lap_solve: col4row must be an int64 CPU tensor of shape [", n, "], got ",
              col4row->scalar_type(), " ", col4row->sizes(), " on ", col4row->device());
  at::Tensor prev = col4row->contiguous();
  const int64_t* p = prev.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= -1 && p[i] < n, "lap_solve: col4row[", i, "] = ", p[i],
                " is out of range [-1, ", n, ")");
  }
  return prev;
}

}  // namespace pyrebasin
