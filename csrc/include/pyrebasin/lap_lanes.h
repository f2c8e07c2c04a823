// The row passes of the CPU lap_solve kernel (csrc/cpu/lap_solve.cpp) in vector lanes: GCC/Clang
// vector extensions, the same operations in the same order per element as a scalar loop (no FMA
// contraction), so every lane width gives bit-identical results. `Max`: the kernel maximises, reading
// each cost entry negated (negation is exact: x + (-c) == x - c), so no negated copy is needed.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

namespace pyrebasin {
namespace lap {

#pragma GCC diagnostic ignored "-Wpsabi"  // wide vectors stay inside always-inline helpers: no ABI crossed
template <int L> struct Lanes {
  typedef double D __attribute__((vector_size(8 * L)));
  typedef int64_t I __attribute__((vector_size(8 * L)));
};
template <class V, class T> __attribute__((always_inline)) inline V load(const T* p) {
  V x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
template <class V, class T> __attribute__((always_inline)) inline void store(T* p, V x) {
  std::memcpy(p, &x, sizeof x);
}
// A cost entry (or lanes of them) as the minimisation reads it.
template <bool Max, class V> __attribute__((always_inline)) inline V entry(V x) { return Max ? -x : x; }

// One row scan of the Dijkstra: for every column j, r = mv + c_ij - u_i - v_j lowers spc[j] (and
// sets path[j] = i) unless j is scanned (gate[j] = +inf). Returns the minimum of spc over the open
// columns (+inf when none is reachable); *argmin is a column attaining it and *count how many do.
template <int L, bool Max>
__attribute__((always_inline)) inline double scan_row_lanes(int64_t n, const double* row, double mv, double ui,
                                                            const double* v, const double* gate, double* spc,
                                                            int64_t* path, int64_t i, int64_t* argmin,
                                                            int64_t* count) {
  using D = typename Lanes<L>::D;
  using I = typename Lanes<L>::I;
  constexpr double inf = std::numeric_limits<double>::infinity();
  D mvv, uiv, low;
  I iv, one, step, at, cnt, jv;
  for (int l = 0; l < L; ++l) {
    mvv[l] = mv; uiv[l] = ui; low[l] = inf;
    iv[l] = i; one[l] = 1; step[l] = L; at[l] = -1; cnt[l] = 0; jv[l] = l;
  }
  int64_t j = 0;
  for (; j + L <= n; j += L, jv += step) {
    const D r = mvv + entry<Max>(load<D>(row + j)) - uiv - load<D>(v + j);
    const D g = load<D>(gate + j);
    D s = load<D>(spc + j);
    const I better = r < s - g;
    s = better ? r : s;
    store(spc + j, s);
    store(path + j, better ? iv : load<I>(path + j));
    const D key = s + g;
    const I lower = key < low, same = key == low;
    cnt = lower ? one : (same ? cnt + one : cnt);
    at = lower ? jv : at;
    low = lower ? key : low;
  }
  double lowest = inf;
  int64_t best = -1, ties = 0;
  for (int l = 0; l < L; ++l) {
    if (low[l] < lowest) {
      lowest = low[l];
      best = at[l];
      ties = cnt[l];
    } else if (low[l] == lowest) {
      ties += cnt[l];
    }
  }
  for (; j < n; ++j) {
    const double r = mv + entry<Max>(row[j]) - ui - v[j];
    if (r < spc[j] - gate[j]) {
      spc[j] = r;
      path[j] = i;
    }
    const double key = spc[j] + gate[j];
    if (key < lowest) {
      lowest = key;
      best = j;
      ties = 1;
    } else if (key == lowest) {
      ++ties;
    }
  }
  *argmin = best;
  *count = ties;
  return lowest;
}

// The two cheapest reduced costs r_j = c_ij - v_j of a row, as the scalar scan in column order finds
// them (the augmenting row reduction's step): (u1, j1) the least (r, j) in lexicographic order and
// (u2, j2) the least of the others ((inf, -1) when n = 1). Each lane keeps its own two least
// (columns l, l + L, ...: increasing, so strict comparisons keep the first), then the lanes are merged
// in (r, j) order and the tail continues the scalar scan: the same two, exactly.
template <int L, bool Max>
__attribute__((always_inline)) inline void two_min_lanes(int64_t n, const double* row, const double* v,
                                                         double* u1, int64_t* j1, double* u2, int64_t* j2) {
  using D = typename Lanes<L>::D;
  using I = typename Lanes<L>::I;
  constexpr double inf = std::numeric_limits<double>::infinity();
  D a, b;
  I ja, jb, jv, step;
  for (int l = 0; l < L; ++l) {
    a[l] = inf; b[l] = inf; ja[l] = -1; jb[l] = -1; jv[l] = l; step[l] = L;
  }
  int64_t j = 0;
  for (; j + L <= n; j += L, jv += step) {
    const D r = entry<Max>(load<D>(row + j)) - load<D>(v + j);
    const I lt1 = r < a, lt2 = r < b;
    b = lt1 ? a : (lt2 ? r : b);
    jb = lt1 ? ja : (lt2 ? jv : jb);
    a = lt1 ? r : a;
    ja = lt1 ? jv : ja;
  }
  double x1 = inf, x2 = inf;
  int64_t k1 = -1, k2 = -1;
  auto push = [&](double r, int64_t k) {  // insert (r, k) into the two least in (r, column) order
    if (k < 0) return;
    if (r < x1 || (r == x1 && k < k1)) {
      x2 = x1; k2 = k1; x1 = r; k1 = k;
    } else if (k2 < 0 || r < x2 || (r == x2 && k < k2)) {
      x2 = r; k2 = k;
    }
  };
  for (int l = 0; l < L; ++l) {
    push(a[l], ja[l]);
    push(b[l], jb[l]);
  }
  for (; j < n; ++j) {  // later columns than every lane's: the scalar scan's own rule
    const double r = entry<Max>(row[j]) - v[j];
    if (r < x2) {
      if (r < x1) {
        x2 = x1; k2 = k1; x1 = r; k1 = j;
      } else {
        x2 = r; k2 = j;
      }
    }
  }
  *u1 = x1; *j1 = k1; *u2 = x2; *j2 = k2;
}

// The Dijkstra's tie break over the open columns attaining `lowest` (spc[k] + gate[k] == lowest):
// *first the one of least position pos[k] (scipy's `remaining` order), *last_free the free one
// (row4col[k] == -1) of greatest position, -1 when none. Positions are distinct, so the lanes'
// minima and maxima merge to exactly the scalar scan's columns.
template <int L>
__attribute__((always_inline)) inline void tie_break_lanes(int64_t n, const double* spc, const double* gate,
                                                           double lowest, const int64_t* pos,
                                                           const int64_t* row4col, int64_t* first,
                                                           int64_t* last_free) {
  using D = typename Lanes<L>::D;
  using I = typename Lanes<L>::I;
  D low;
  I fp, fk, lp, lk, jv, step, none;
  for (int l = 0; l < L; ++l) {
    low[l] = lowest; fp[l] = INT64_MAX; fk[l] = -1; lp[l] = -1; lk[l] = -1; jv[l] = l; step[l] = L; none[l] = -1;
  }
  int64_t j = 0;
  for (; j + L <= n; j += L, jv += step) {
    const I hit = load<D>(spc + j) + load<D>(gate + j) == low;
    const I p = load<I>(pos + j);
    const I f = hit & (p < fp);
    fp = f ? p : fp;
    fk = f ? jv : fk;
    const I g = hit & (load<I>(row4col + j) == none) & (p > lp);
    lp = g ? p : lp;
    lk = g ? jv : lk;
  }
  int64_t bf = INT64_MAX, kf = -1, bl = -1, kl = -1;
  for (int l = 0; l < L; ++l) {
    if (fk[l] >= 0 && fp[l] < bf) { bf = fp[l]; kf = fk[l]; }
    if (lk[l] >= 0 && lp[l] > bl) { bl = lp[l]; kl = lk[l]; }
  }
  for (; j < n; ++j) {
    if (spc[j] + gate[j] != lowest) continue;
    if (pos[j] < bf) { bf = pos[j]; kf = j; }
    if (row4col[j] == -1 && pos[j] > bl) { bl = pos[j]; kl = j; }
  }
  *first = kf;
  *last_free = kl;
}

}  // namespace lap
}  // namespace pyrebasin
