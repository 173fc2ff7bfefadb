// ModelGuard-W (MLD) per-row solver shared by the CPU and CUDA kernels (host + device).
//
// One row y [K] (y ≥ 0), c_j = log(y_j + offset) (float64), m = first argmax of y, δ = margin:
//   minimise Σ_j c_j x_j  s.t.  x ≥ 0, Σx = 1, ‖x − y‖₁ ≤ ε, x_m − x_j ≥ δ (j ≠ m).
// With t = x_m and U = t − δ the other classes live in [0, U]. For a fixed t the optimum is
// greedy (`mg_greedy`): start from z_j = min(y_j, U) (forced cost F = Σ(y_j − U)₊), fix the
// imbalance Δ = (1 − t) − Σz by filling the lowest-c classes up to U (Δ > 0) or emptying the
// highest-c classes (Δ < 0), then spend the rest R = ε − |y_m − t| − F − |Δ| on voluntary
// transfers of up to R/2 from the highest-c class still holding mass to the lowest-c class
// with room, while c_donor > c_receiver. f(t) is convex piecewise-linear on the feasible t
// interval {t : g(t) ≤ ε}, g(t) = |y_m − t| + F + |Δ| the least L1 move for that t (also
// convex): its ends are found by bisection, the minimiser of f by golden-section search, both
// with fixed iteration counts. ε is honoured to kMgBudgetTol. Rows where no t is feasible are
// returned as y, flagged.
// `order` [K] lists the classes by ascending c, ties by index (the caller sorts).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MG_HD __host__ __device__ __forceinline__
#else
#define MG_HD inline
#endif

namespace ppoison {

constexpr int kMgBisectIters = 55;  // 2^-55 < 3e-17: t to float64 resolution on [0, 1]
constexpr int kMgGoldenIters = 80;  // 0.618^80 < 2e-17
constexpr double kMgGolden = 0.6180339887498948482;
constexpr double kMgBudgetTol = 1e-12;  // ε is honoured to this (absolute): float64 sums of y are inexact

// Where the greedy stopped: positions < ir of `order` are filled to U, position ir holds
// z + rused; positions > id are emptied to 0, position id holds z − dused.
struct MgGreedy {
  double f;
  int ir, id;
  double rused, dused;
};

template <typename scalar_t>
struct MgRow {
  const scalar_t* y;
  const double* c;
  const int64_t* order;
  int K, m;
  double ym, eps, delta;

  MG_HD double yj(int j) const { return (double)y[j]; }

  // Least L1 distance from y to a point with x_m = t (inf when no such point exists).
  MG_HD double g(double t) const {
    const double U = t - delta;
    if (U < 0.0) return INFINITY;
    double F = 0.0, sz = 0.0;
    for (int j = 0; j < K; ++j) {
      if (j == m) continue;
      const double v = yj(j), z = v < U ? v : U;
      F += v - z;
      sz += z;
    }
    const double D = (1.0 - t) - sz;
    if (D > (double)(K - 1) * U - sz + 1e-15) return INFINITY;  // not enough room below U
    return fabs(ym - t) + F + fabs(D);
  }

  MG_HD double cap(int pos, double U) const {
    const double v = yj((int)order[pos]);
    return U - (v < U ? v : U);
  }
  MG_HD double mass(int pos, double U) const {
    const double v = yj((int)order[pos]);
    return v < U ? v : U;
  }

  // f(t) and where the greedy stopped; f = inf when t is infeasible.
  MG_HD MgGreedy greedy(double t) const {
    MgGreedy r{INFINITY, 0, K - 1, 0.0, 0.0};
    const double U = t - delta;
    if (U < 0.0) return r;
    double F = 0.0, sz = 0.0, obj = c[m] * t;
    for (int j = 0; j < K; ++j) {
      if (j == m) continue;
      const double v = yj(j), z = v < U ? v : U;
      F += v - z;
      sz += z;
      obj += c[j] * z;
    }
    const double D = (1.0 - t) - sz;
    const double R = eps - fabs(ym - t) - F - fabs(D);
    if (R < 0.0) return r;
    int ir = 0, id = K - 1;
    double rused = 0.0, dused = 0.0;
    // forced: receivers ascending c
    double need = D > 0.0 ? D : 0.0;
    while (need > 0.0 && ir < K) {
      const int j = (int)order[ir];
      const double room = j == m ? 0.0 : cap(ir, U) - rused;
      if (room >= need) {
        rused += need;
        obj += c[j] * need;
        need = 0.0;
      } else {
        if (room > 0.0) obj += c[j] * room;
        need -= room > 0.0 ? room : 0.0;
        ++ir;
        rused = 0.0;
      }
    }
    if (need > 1e-12) return r;
    // forced: donors descending c
    need = D < 0.0 ? -D : 0.0;
    while (need > 0.0 && id >= 0) {
      const int j = (int)order[id];
      const double have = j == m ? 0.0 : mass(id, U) - dused;
      if (have >= need) {
        dused += need;
        obj -= c[j] * need;
        need = 0.0;
      } else {
        if (have > 0.0) obj -= c[j] * have;
        need -= have > 0.0 ? have : 0.0;
        --id;
        dused = 0.0;
      }
    }
    if (need > 1e-12) return r;
    // voluntary transfers, each unit costs 2 of the budget
    double v = 0.5 * R;
    while (v > 0.0) {
      // the pointers never pass each other: a class that received is not "emptied" (and
      // vice versa) just because its own mass (room) is 0
      while (ir < id && ((int)order[ir] == m || cap(ir, U) - rused <= 0.0)) {
        ++ir;
        rused = 0.0;
      }
      while (id > ir && ((int)order[id] == m || mass(id, U) - dused <= 0.0)) {
        --id;
        dused = 0.0;
      }
      if (ir >= id) break;
      const int jr = (int)order[ir], jd = (int)order[id];
      if (!(c[jd] > c[jr])) break;
      double a = cap(ir, U) - rused;
      const double b = mass(id, U) - dused;
      if (b < a) a = b;
      if (v < a) a = v;
      rused += a;
      dused += a;
      v -= a;
      obj += (c[jr] - c[jd]) * a;
    }
    r.f = obj;
    r.ir = ir;
    r.id = id;
    r.rused = rused;
    r.dused = dused;
    return r;
  }

  // x at t from the greedy's stopping point, into out [K] (one rounding per entry).
  template <typename out_t>
  MG_HD double write(double t, const MgGreedy& s, out_t* out) const {
    const double U = t - delta;
    double obj = 0.0;
    for (int pos = 0; pos < K; ++pos) {
      const int j = (int)order[pos];
      double x;
      if (j == m) {
        x = t;
      } else {
        const double v = yj(j);
        x = v < U ? v : U;
        if (pos < s.ir) x = U;
        else if (pos == s.ir) x += s.rused;
        if (pos > s.id) x = 0.0;
        else if (pos == s.id) x -= s.dused;
        if (x < 0.0) x = 0.0;
      }
      obj += c[j] * x;
      out[j] = (out_t)x;
    }
    return obj;
  }

  // Bisection for the boundary of {g ≤ ε} between a feasible and an infeasible t.
  MG_HD double boundary(double feas, double infeas) const {
    for (int i = 0; i < kMgBisectIters; ++i) {
      const double mid = 0.5 * (feas + infeas);
      if (mid == feas || mid == infeas) break;
      if (g(mid) <= eps) feas = mid;
      else infeas = mid;
    }
    return feas;
  }
};

// Golden-section minimum of a convex fn on [a, b]; returns the best t seen (first of equals).
template <typename Fn>
MG_HD double mg_golden(double a, double b, const Fn& fn, double* fbest_out) {
  double tb = a, fb = fn(a);
  const double fhi = fn(b);
  if (fhi < fb) {
    tb = b;
    fb = fhi;
  }
  double x1 = b - kMgGolden * (b - a), x2 = a + kMgGolden * (b - a);
  double f1 = fn(x1), f2 = fn(x2);
  for (int i = 0; i < kMgGoldenIters; ++i) {
    if (f1 <= f2) {
      b = x2;
      x2 = x1;
      f2 = f1;
      x1 = b - kMgGolden * (b - a);
      f1 = fn(x1);
    } else {
      a = x1;
      x1 = x2;
      f1 = f2;
      x2 = a + kMgGolden * (b - a);
      f2 = fn(x2);
    }
    if (f1 < fb) {
      fb = f1;
      tb = x1;
    }
    if (f2 < fb) {
      fb = f2;
      tb = x2;
    }
  }
  *fbest_out = fb;
  return tb;
}

template <typename scalar_t>
struct MgG {
  const MgRow<scalar_t>* r;
  MG_HD double operator()(double t) const { return r->g(t); }
};
template <typename scalar_t>
struct MgF {
  const MgRow<scalar_t>* r;
  MG_HD double operator()(double t) const { return r->greedy(t).f; }
};

// Solves one row: writes x [K] to out, returns the objective Σ c x (of the rounded-once
// float64 x) and sets *feasible; infeasible rows get x = y and the objective of y.
template <typename scalar_t>
MG_HD double mg_solve_row(const scalar_t* y, const double* c, const int64_t* order, int K, double eps, double delta,
                          scalar_t* out, bool* feasible) {
  int m = 0;
  for (int j = 1; j < K; ++j)
    if ((double)y[j] > (double)y[m]) m = j;
  MgRow<scalar_t> row{y, c, order, K, m, (double)y[m], eps + kMgBudgetTol, delta};
  double lo = (1.0 + (double)(K - 1) * delta) / (double)K;
  if (lo < delta) lo = delta;
  const double hi = 1.0;
  bool ok = lo <= hi;
  double t0 = row.ym;
  if (ok) {
    bool margin = true;
    for (int j = 0; j < K; ++j)
      if (j != m && row.ym - (double)y[j] < delta) margin = false;
    if (!(margin && t0 >= lo && t0 <= hi)) {
      double gmin;
      t0 = mg_golden(lo, hi, MgG<scalar_t>{&row}, &gmin);
    }
    ok = row.g(t0) <= row.eps;
  }
  if (!ok) {
    double obj = 0.0;
    for (int j = 0; j < K; ++j) {
      out[j] = y[j];
      obj += c[j] * (double)y[j];
    }
    *feasible = false;
    return obj;
  }
  const double a = row.g(lo) <= row.eps ? lo : row.boundary(t0, lo);
  const double b = row.g(hi) <= row.eps ? hi : row.boundary(t0, hi);
  double fbest;
  double t = mg_golden(a, b, MgF<scalar_t>{&row}, &fbest);
  MgGreedy s = row.greedy(t);
  if (!(s.f < INFINITY)) {  // rounding at an end of the interval: fall back to t0, feasible by construction
    t = t0;
    s = row.greedy(t);
  }
  *feasible = true;
  return row.write(t, s, out);
}

}  // namespace ppoison
