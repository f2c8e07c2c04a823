// CPU kernel of pyrebasin::lap_solve: minimum-cost perfect assignment of a dense square float64
// cost matrix by shortest augmenting paths (Jonker-Volgenant / Crouse, as in scipy's
// linear_sum_assignment), optionally warm-started from the column duals and assignment of a
// previous solve: rows whose old column is still tight keep it, only the others are augmented.
// Before the Dijkstra phase, JV's augmenting row reduction settles most free rows at one row scan
// each (cold solves and warm ones alike).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "pyrebasin/lap_solve_checks.h"

namespace pyrebasin {
namespace {

// Two-lane GCC/Clang vector extensions (one SSE2 register on x86-64) for the passes over whole
// rows whose result does not depend on the order of the elements (a minimum, a finiteness test).
constexpr int64_t kLanes = 2;
typedef double d4 __attribute__((vector_size(16)));
typedef int64_t i4 __attribute__((vector_size(16)));

inline d4 load4(const double* p) { d4 x; std::memcpy(&x, p, sizeof x); return x; }
inline i4 load4(const int64_t* p) { i4 x; std::memcpy(&x, p, sizeof x); return x; }
inline void store4(double* p, d4 x) { std::memcpy(p, &x, sizeof x); }
inline void store4(int64_t* p, i4 x) { std::memcpy(p, &x, sizeof x); }

// min_j (row[j] - v[j]) (exact in any order: two lanes, then the tail).
double row_min(int64_t n, const double* row, const double* v) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  d4 low = {inf, inf};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const d4 r = load4(row + j) - load4(v + j);
    low = r < low ? r : low;
  }
  double best = std::min(low[0], low[1]);
  for (; j < n; ++j) best = std::min(best, row[j] - v[j]);
  return best;
}

// Whether every entry of cost[0, m) is finite (x - x is 0 exactly for finite x, NaN otherwise).
bool all_finite(const double* cost, int64_t m) {
  i4 bad = {0, 0};
  int64_t k = 0;
  for (; k + kLanes <= m; k += kLanes) {
    const d4 x = load4(cost + k);
    const d4 z = x - x;
    bad |= z != z;
  }
  bool ok = (bad[0] | bad[1]) == 0;
  for (; k < m; ++k) ok &= std::isfinite(cost[k]);
  return ok;
}

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

// The shortest-augmenting-path state: costs, duals and the assignment in both directions.
struct LapWork {
  int64_t n;
  const double* cost;
  double* v;
  int64_t* col4row;
  std::vector<double> u;
  std::vector<int64_t> row4col;
};

// Jonker-Volgenant's augmenting row reduction: each free row takes its cheapest column at the
// price of its second cheapest (lowering that column's dual), evicting the row that held it. Each
// step costs one row scan and keeps every reduced cost >= 0 and assigned edges tight, so the
// Dijkstra phase afterwards starts with far fewer free rows. Two passes, as in JV.
void augmenting_row_reduction(LapWork& w) {
  const int64_t n = w.n;
  std::vector<int64_t> free_rows;
  for (int64_t i = 0; i < n; ++i)
    if (w.col4row[i] == -1) free_rows.push_back(i);
  for (int pass = 0; pass < 2 && !free_rows.empty(); ++pass) {
    size_t current = 0, kept = 0;
    int64_t steps = 0;
    // JV bounds the steps by (free rows) * n; price wars between near-tied rows make that slow here,
    // and 8 steps per free row settled ~99% of them on weight-matching costs (docs/alignment.md).
    const int64_t limit = static_cast<int64_t>(free_rows.size()) * 8;
    while (current < free_rows.size()) {
      const int64_t i = free_rows[current++];
      ++steps;
      const double* row = w.cost + i * n;
      double u1 = std::numeric_limits<double>::infinity(), u2 = u1;
      int64_t j1 = -1, j2 = -1;
      for (int64_t j = 0; j < n; ++j) {
        const double r = row[j] - w.v[j];
        if (r < u2) {
          if (r < u1) {
            u2 = u1; j2 = j1; u1 = r; j1 = j;
          } else {
            u2 = r; j2 = j;
          }
        }
      }
      int64_t i0 = w.row4col[j1];
      const bool lowers = j2 >= 0 && u1 < u2;
      if (steps < limit) {
        if (lowers) {
          w.v[j1] -= u2 - u1;
        } else if (i0 >= 0 && j2 >= 0) {
          j1 = j2;  // a tie: take the other cheapest column if it is free
          i0 = w.row4col[j1];
        }
        if (i0 >= 0) {
          w.col4row[i0] = -1;
          if (lowers) free_rows[--current] = i0; else free_rows[kept++] = i0;
        }
      } else if (i0 >= 0) {
        w.col4row[i0] = -1;
        free_rows[kept++] = i0;
      }
      w.col4row[i] = j1;
      w.row4col[j1] = i;
      w.u[i] = row[j1] - w.v[j1];  // tight; <= every other reduced cost of row i
    }
    free_rows.resize(kept);
  }
}

void solve(LapWork& w, const int64_t* prev, int64_t* augmentations) {
  const int64_t n = w.n;
  const double* cost = w.cost;
  double* v = w.v;
  std::vector<double> spc(n);
  std::vector<int64_t> path(n, -1), remaining(n);
  std::vector<char> SR(n), SC(n);
  if (prev != nullptr) {
    // u_i = min_j (c_ij - v_j) keeps every reduced cost >= 0; a row keeps its old column only if
    // that column attains the minimum (complementary slackness), so the result stays optimal.
    for (int64_t i = 0; i < n; ++i) {
      const double* row = cost + i * n;
      const double best = row_min(n, row, v);
      w.u[i] = best;
      const int64_t j = prev[i];
      // Ties of the previous solve come back within rounding: accept the old column within a
      // relative 1e-13 of the minimum (made exactly tight; others' reduced costs >= -1e-13|u|).
      if (j >= 0 && w.row4col[j] == -1 && row[j] - v[j] <= best + 1e-13 * (std::abs(best) + 1.0)) {
        w.u[i] = row[j] - v[j];
        w.col4row[i] = j;
        w.row4col[j] = i;
      }
    }
  }
  augmenting_row_reduction(w);
  for (int64_t cur = 0; cur < n; ++cur) {
    if (w.col4row[cur] != -1) continue;
    double min_val = 0;
    const int64_t sink = augmenting_path(n, cost, w.u.data(), v, path.data(), w.row4col.data(),
                                         spc.data(), SR.data(), SC.data(), remaining.data(), cur, &min_val);
    TORCH_CHECK(sink >= 0, "lap_solve: the assignment problem is infeasible");
    ++*augmentations;
    w.u[cur] += min_val;
    for (int64_t i = 0; i < n; ++i)
      if (SR[i] && i != cur) w.u[i] += min_val - spc[w.col4row[i]];
    for (int64_t j = 0; j < n; ++j)
      if (SC[j]) v[j] -= min_val - spc[j];
    int64_t j = sink;
    while (true) {
      const int64_t i = path[j];
      w.row4col[j] = i;
      std::swap(w.col4row[i], j);
      if (i == cur) break;
    }
  }
}

}  // namespace

// Returns (col4row int64 [n], v float64 [n] column duals, augmentations int64 scalar).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lap_solve_cpu(const at::Tensor& cost_in,
                                                             const std::optional<at::Tensor>& v_in,
                                                             const std::optional<at::Tensor>& col4row_in) {
  const at::Tensor prev_t = check_lap_solve_args(cost_in, v_in, col4row_in);
  const bool warm = prev_t.defined();
  const int64_t n = cost_in.size(0);
  const int64_t* prev = warm ? prev_t.const_data_ptr<int64_t>() : nullptr;
  const auto cost_t = cost_in.contiguous();
  if (!all_finite(cost_t.const_data_ptr<double>(), n * n)) {
    check_lap_cost_finite(cost_t.const_data_ptr<double>(), n);  // names the first bad entry
  }
  at::Tensor col4row_t = at::full({n}, -1, at::kLong);
  at::Tensor v_t = warm ? v_in->clone().contiguous() : at::zeros({n}, at::kDouble);
  LapWork w{n, cost_t.const_data_ptr<double>(), v_t.data_ptr<double>(), col4row_t.data_ptr<int64_t>(),
            std::vector<double>(n, 0.0), std::vector<int64_t>(n, -1)};
  int64_t augmentations = 0;
  solve(w, prev, &augmentations);
  return {col4row_t, v_t, at::scalar_tensor(augmentations, at::kLong)};
}

TORCH_LIBRARY_IMPL(pyrebasin, CPU, m) { m.impl("lap_solve", &lap_solve_cpu); }

}  // namespace pyrebasin
