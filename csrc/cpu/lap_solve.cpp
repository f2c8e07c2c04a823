// CPU kernel of pyrebasin::lap_solve: minimum-cost perfect assignment of a dense square float64
// cost matrix by shortest augmenting paths (Jonker-Volgenant / Crouse, as in scipy's
// linear_sum_assignment), optionally warm-started from the column duals and assignment of a
// previous solve: rows whose old column is still tight keep it, only the others are augmented.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace pyrebasin {
namespace {

// One Dijkstra from free row `i` over reduced costs c - u - v (non-negative for assigned rows);
// returns the free column reached (sink) and the path length in *min_val.
int64_t augmenting_path(int64_t n, const double* cost, const double* u, const double* v,
                        int64_t* path, const int64_t* row4col, double* spc, char* SR, char* SC,
                        int64_t* remaining, int64_t i, double* min_val) {
  double mv = 0;
  int64_t num_remaining = n;
  for (int64_t it = 0; it < n; ++it) remaining[it] = n - it - 1;
  std::fill(SR, SR + n, 0);
  std::fill(SC, SC + n, 0);
  std::fill(spc, spc + n, std::numeric_limits<double>::infinity());
  int64_t sink = -1;
  while (sink == -1) {
    int64_t index = -1;
    double lowest = std::numeric_limits<double>::infinity();
    SR[i] = 1;
    const double* row = cost + i * n;
    const double ui = u[i];
    for (int64_t it = 0; it < num_remaining; ++it) {
      const int64_t j = remaining[it];
      const double r = mv + row[j] - ui - v[j];
      if (r < spc[j]) {
        path[j] = i;
        spc[j] = r;
      }
      if (spc[j] < lowest || (spc[j] == lowest && row4col[j] == -1)) {
        lowest = spc[j];
        index = it;
      }
    }
    mv = lowest;
    if (!std::isfinite(mv)) return -1;
    const int64_t j = remaining[index];
    if (row4col[j] == -1) sink = j; else i = row4col[j];
    SC[j] = 1;
    remaining[index] = remaining[--num_remaining];
  }
  *min_val = mv;
  return sink;
}

}  // namespace

// Returns (col4row int64 [n], v float64 [n] column duals, augmentations int64 scalar).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lap_solve_cpu(const at::Tensor& cost_in,
                                                             const std::optional<at::Tensor>& v_in,
                                                             const std::optional<at::Tensor>& col4row_in) {
  TORCH_CHECK(cost_in.device().is_cpu(), "lap_solve: cost must be on the CPU, got ", cost_in.device());
  TORCH_CHECK(cost_in.scalar_type() == at::kDouble, "lap_solve: cost must be float64, got ",
              cost_in.scalar_type());
  TORCH_CHECK(cost_in.dim() == 2 && cost_in.size(0) == cost_in.size(1),
              "lap_solve: cost must be a square [n, n] matrix, got ", cost_in.sizes());
  const int64_t n = cost_in.size(0);
  const bool warm = v_in.has_value() && col4row_in.has_value();
  TORCH_CHECK(v_in.has_value() == col4row_in.has_value(),
              "lap_solve: pass both v and col4row for a warm start, or neither");
  if (warm) {
    TORCH_CHECK(v_in->scalar_type() == at::kDouble && v_in->dim() == 1 && v_in->size(0) == n &&
                    v_in->device().is_cpu(),
                "lap_solve: v must be a float64 CPU tensor of shape [", n, "], got ", v_in->sizes());
    TORCH_CHECK(col4row_in->scalar_type() == at::kLong && col4row_in->dim() == 1 &&
                    col4row_in->size(0) == n && col4row_in->device().is_cpu(),
                "lap_solve: col4row must be an int64 CPU tensor of shape [", n, "], got ",
                col4row_in->sizes());
  }
  const auto cost_t = cost_in.contiguous();
  const double* cost = cost_t.const_data_ptr<double>();
  TORCH_CHECK(at::isfinite(cost_t).all().item<bool>(), "lap_solve: cost has NaN or infinite entries");
  at::Tensor col4row_t = at::full({n}, -1, at::kLong);
  at::Tensor v_t = warm ? v_in->clone() : at::zeros({n}, at::kDouble);
  int64_t* col4row = col4row_t.data_ptr<int64_t>();
  double* v = v_t.data_ptr<double>();
  std::vector<double> u(n, 0.0), spc(n);
  std::vector<int64_t> path(n, -1), row4col(n, -1), remaining(n);
  std::vector<char> SR(n), SC(n);
  if (warm) {
    // u_i = min_j (c_ij - v_j) keeps every reduced cost >= 0; a row keeps its old column only if
    // that column attains the minimum (complementary slackness), so the result stays optimal.
    const int64_t* prev = col4row_in->const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      const double* row = cost + i * n;
      double best = std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < n; ++j) best = std::min(best, row[j] - v[j]);
      u[i] = best;
      const int64_t j = prev[i];
      TORCH_CHECK(j >= -1 && j < n, "lap_solve: col4row[", i, "] = ", j, " is out of range");
      // Ties of the previous solve come back within rounding: accept the old column within a
      // relative 1e-13 of the minimum (made exactly tight; others' reduced costs >= -1e-13|u|).
      if (j >= 0 && row4col[j] == -1 && row[j] - v[j] <= best + 1e-13 * (std::abs(best) + 1.0)) {
        u[i] = row[j] - v[j];
        col4row[i] = j;
        row4col[j] = i;
      }
    }
  }
  int64_t augmentations = 0;
  for (int64_t cur = 0; cur < n; ++cur) {
    if (col4row[cur] != -1) continue;
    double min_val = 0;
    const int64_t sink = augmenting_path(n, cost, u.data(), v, path.data(), row4col.data(), spc.data(),
                                         SR.data(), SC.data(), remaining.data(), cur, &min_val);
    TORCH_CHECK(sink >= 0, "lap_solve: the assignment problem is infeasible");
    ++augmentations;
    u[cur] += min_val;
    for (int64_t i = 0; i < n; ++i)
      if (SR[i] && i != cur) u[i] += min_val - spc[col4row[i]];
    for (int64_t j = 0; j < n; ++j)
      if (SC[j]) v[j] -= min_val - spc[j];
    int64_t j = sink;
    while (true) {
      const int64_t i = path[j];
      row4col[j] = i;
      std::swap(col4row[i], j);
      if (i == cur) break;
    }
  }
  return {col4row_t, v_t, at::scalar_tensor(augmentations, at::kLong)};
}

TORCH_LIBRARY_IMPL(pyrebasin, CPU, m) { m.impl("lap_solve", &lap_solve_cpu); }

}  // namespace pyrebasin
