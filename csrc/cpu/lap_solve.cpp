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

#include "pyrebasin/lap_lanes.h"
#include "pyrebasin/lap_solve_checks.h"

namespace pyrebasin {
namespace {

using lap::entry;
using lap::load;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <bool Max>
__attribute__((target("avx2"))) double scan_row_avx2(int64_t n, const double* row, double mv, double ui,
                                                     const double* v, const double* gate, double* spc,
                                                     int64_t* path, int64_t i, int64_t* argmin, int64_t* count) {
  return lap::scan_row_lanes<4, Max>(n, row, mv, ui, v, gate, spc, path, i, argmin, count);
}
template <bool Max>
__attribute__((target("avx2"))) void two_min_avx2(int64_t n, const double* row, const double* v, double* u1,
                                                  int64_t* j1, double* u2, int64_t* j2) {
  lap::two_min_lanes<4, Max>(n, row, v, u1, j1, u2, j2);
}
__attribute__((target("avx2"))) void tie_break_avx2(int64_t n, const double* spc, const double* gate, double lowest,
                                                    const int64_t* pos, const int64_t* row4col, int64_t* first,
                                                    int64_t* last_free) {
  lap::tie_break_lanes<4>(n, spc, gate, lowest, pos, row4col, first, last_free);
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#define PRB_LAP_AVX2 1
#else
const bool kHasAvx2 = false;
#endif

template <bool Max>
double scan_row(int64_t n, const double* row, double mv, double ui, const double* v, const double* gate,
                double* spc, int64_t* path, int64_t i, int64_t* argmin, int64_t* count) {
#ifdef PRB_LAP_AVX2
  if (kHasAvx2) return scan_row_avx2<Max>(n, row, mv, ui, v, gate, spc, path, i, argmin, count);
#endif
  return lap::scan_row_lanes<2, Max>(n, row, mv, ui, v, gate, spc, path, i, argmin, count);
}

// The Dijkstra's tie break (lap_lanes.h: the scalar scan's columns).
void tie_break(int64_t n, const double* spc, const double* gate, double lowest, const int64_t* pos,
               const int64_t* row4col, int64_t* first, int64_t* last_free) {
#ifdef PRB_LAP_AVX2
  if (kHasAvx2) return tie_break_avx2(n, spc, gate, lowest, pos, row4col, first, last_free);
#endif
  lap::tie_break_lanes<2>(n, spc, gate, lowest, pos, row4col, first, last_free);
}

// The augmenting row reduction's two cheapest reduced costs of a row (lap_lanes.h: the scalar scan's).
template <bool Max>
void two_min(int64_t n, const double* row, const double* v, double* u1, int64_t* j1, double* u2, int64_t* j2) {
#ifdef PRB_LAP_AVX2
  if (kHasAvx2) return two_min_avx2<Max>(n, row, v, u1, j1, u2, j2);
#endif
  lap::two_min_lanes<2, Max>(n, row, v, u1, j1, u2, j2);
}

// Two lanes for the passes over whole rows whose result does not depend on the element order.
constexpr int64_t kLanes = 2;
typedef lap::Lanes<2>::D d4;
typedef lap::Lanes<2>::I i4;
inline d4 load4(const double* p) { return load<d4>(p); }

// min_j (row[j] - v[j]) (exact in any order: two lanes, then the tail); *finite is cleared when an
// entry of the row is NaN or infinite (x - x is 0 exactly for finite x, NaN otherwise), so a warm
// start reads the cost once for both.
template <bool Max>
double row_min(int64_t n, const double* row, const double* v, bool* finite) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  d4 low = {inf, inf};
  i4 bad = {0, 0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const d4 x = load4(row + j);
    const d4 z = x - x;
    bad |= z != z;
    const d4 r = entry<Max>(x) - load4(v + j);
    low = r < low ? r : low;
  }
  double best = std::min(low[0], low[1]);
  bool ok = (bad[0] | bad[1]) == 0;
  for (; j < n; ++j) {
    ok &= std::isfinite(row[j]);
    best = std::min(best, entry<Max>(row[j]) - v[j]);
  }
  *finite &= ok;
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
//
// Each row scan runs over all n columns in index order, branch-free, so that it vectorises:
// `gate[j]` is 0 for a column still open and +inf once scanned (spc - gate never admits an update
// of a scanned column; spc + gate is +inf there for the minimum). Its result is the one of scipy's
// scan over the open columns in `remaining` order (the first column attaining the minimum, or the
// last free one that does): when one column attains the minimum it is that column, and on a tie
// the `remaining` order (kept with `pos`, positions by column) decides as it always did.
template <bool Max>
int64_t augmenting_path(int64_t n, const double* cost, const double* u, const double* v,
                        int64_t* path, const int64_t* row4col, double* spc, double* gate, char* SR,
                        char* SC, int64_t* remaining, int64_t* pos, int64_t i, double* min_val) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  double mv = 0;
  int64_t num_remaining = n;
  for (int64_t it = 0; it < n; ++it) {
    remaining[it] = n - it - 1;
    pos[n - it - 1] = it;
  }
  std::fill(SR, SR + n, 0);
  std::fill(SC, SC + n, 0);
  std::fill(spc, spc + n, inf);
  std::fill(gate, gate + n, 0.0);
  int64_t sink = -1;
  while (sink == -1) {
    SR[i] = 1;
    const double* row = cost + i * n;
    const double ui = u[i];
    int64_t j = -1, ties = 0;
    const double lowest = scan_row<Max>(n, row, mv, ui, v, gate, spc, path, i, &j, &ties);
    if (!std::isfinite(lowest)) return -1;
    if (ties > 1) {
      // scipy's scan over the open columns in `remaining` order takes the first column attaining
      // the minimum, unless a free one attains it: then the last free one. pos[] gives that order.
      int64_t first = -1, last_free = -1;
      tie_break(n, spc, gate, lowest, pos, row4col, &first, &last_free);  // in vector lanes (lap_lanes.h)
      j = last_free >= 0 ? last_free : first;
    }
    mv = spc[j];  // == lowest (also in the sign of a zero)
    if (row4col[j] == -1) sink = j; else i = row4col[j];
    SC[j] = 1;
    gate[j] = inf;
    const int64_t last = remaining[--num_remaining];
    remaining[pos[j]] = last;
    pos[last] = pos[j];
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
template <bool Max>
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
      double u1, u2;
      int64_t j1, j2;
      two_min<Max>(n, row, w.v, &u1, &j1, &u2, &j2);  // the two cheapest r_j = c_ij - v_j, first columns first
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
      w.u[i] = entry<Max>(row[j1]) - w.v[j1];  // tight; <= every other reduced cost of row i
    }
    free_rows.resize(kept);
  }
}

template <bool Max>
void solve(LapWork& w, const int64_t* prev, int64_t* augmentations) {
  const int64_t n = w.n;
  const double* cost = w.cost;
  double* v = w.v;
  std::vector<double> spc(n), gate(n);
  std::vector<int64_t> path(n, -1), remaining(n), pos(n);
  std::vector<char> SR(n), SC(n);
  if (prev != nullptr) {
    // u_i = min_j (c_ij - v_j) keeps every reduced cost >= 0; a row keeps its old column only if
    // that column attains the minimum (complementary slackness), so the result stays optimal.
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
      const double* row = cost + i * n;
      const double best = row_min<Max>(n, row, v, &finite);
      if (!finite) check_lap_cost_finite(cost, n);  // names the first bad entry (its caller checked none)
      w.u[i] = best;
      const int64_t j = prev[i];
      // Ties of the previous solve come back within rounding: accept the old column within a
      // relative 1e-13 of the minimum (made exactly tight; others' reduced costs >= -1e-13|u|).
      if (j >= 0 && w.row4col[j] == -1 && entry<Max>(row[j]) - v[j] <= best + 1e-13 * (std::abs(best) + 1.0)) {
        w.u[i] = entry<Max>(row[j]) - v[j];
        w.col4row[i] = j;
        w.row4col[j] = i;
      }
    }
  }
  augmenting_row_reduction<Max>(w);
  for (int64_t cur = 0; cur < n; ++cur) {
    if (w.col4row[cur] != -1) continue;
    double min_val = 0;
    const int64_t sink = augmenting_path<Max>(n, cost, w.u.data(), v, path.data(), w.row4col.data(), spc.data(),
                                         gate.data(), SR.data(), SC.data(), remaining.data(), pos.data(),
                                         cur, &min_val);
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

// Returns (col4row int64 [n], v float64 [n] column duals, augmentations int64 scalar). `maximize`: the
// minimum of -cost, read negated in place (the same numbers as solving a negated copy).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lap_solve_cpu(const at::Tensor& cost_in,
                                                             const std::optional<at::Tensor>& v_in,
                                                             const std::optional<at::Tensor>& col4row_in,
                                                             bool maximize) {
  const at::Tensor prev_t = check_lap_solve_args(cost_in, v_in, col4row_in);
  const bool warm = prev_t.defined();
  const int64_t n = cost_in.size(0);
  const int64_t* prev = warm ? prev_t.const_data_ptr<int64_t>() : nullptr;
  const auto cost_t = cost_in.contiguous();
  if (!warm && !all_finite(cost_t.const_data_ptr<double>(), n * n)) {  // a warm start checks in its row minima
    check_lap_cost_finite(cost_t.const_data_ptr<double>(), n);  // names the first bad entry
  }
  at::Tensor col4row_t = at::full({n}, -1, at::kLong);
  at::Tensor v_t = warm ? v_in->clone().contiguous() : at::zeros({n}, at::kDouble);
  LapWork w{n, cost_t.const_data_ptr<double>(), v_t.data_ptr<double>(), col4row_t.data_ptr<int64_t>(),
            std::vector<double>(n, 0.0), std::vector<int64_t>(n, -1)};
  int64_t augmentations = 0;
  if (maximize) {
    solve<true>(w, prev, &augmentations);
  } else {
    solve<false>(w, prev, &augmentations);
  }
  return {col4row_t, v_t, at::scalar_tensor(augmentations, at::kLong)};
}

TORCH_LIBRARY_IMPL(pyrebasin, CPU, m) { m.impl("lap_solve", &lap_solve_cpu); }

}  // namespace pyrebasin
