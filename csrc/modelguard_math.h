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
// convex, minimal at t0). f plus a penalty outside that interval is quasi-convex, so a single
// golden-section search (to a 1e-13 bracket on t) finds the minimiser. ε is honoured to
// kMgBudgetTol. Rows where no t is feasible (g(t0) > ε) are returned as y, flagged.
// The caller sorts: `order` [K] lists the classes by ascending c, ties by index; the solver
// works on y and c in that order.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MG_HD __host__ __device__ __forceinline__
#else
#define MG_HD inline
#endif

namespace ppoison {

constexpr int kMgGoldenIters = 80;  // at most; 0.618^80 < 2e-17
constexpr double kMgTTol = 1e-13;   // stop once the bracket on t is this narrow (f moves < 1e-10)
constexpr double kMgGolden = 0.6180339887498948482;
constexpr double kMgBudgetTol = 1e-12;
constexpr double kMgPenalty = 1e6;  // above any objective (|c| ≤ −log(offset))  // ε is honoured to this (absolute): float64 sums of y are inexact

// Where the greedy stopped: positions < ir of `order` are filled to U, position ir holds
// z + rused; positions > id are emptied to 0, position id holds z − dused.
struct MgGreedy {
  double f;
  int ir, id;
  double rused, dused;
};

// One row in ascending-c positions: ys, cs [K] are y and c sorted by `order`, pm the position
// of m.
struct MgRow {
  const double* ys;
  const double* cs;
  int K, pm;
  double ym, eps, delta;

  // Least L1 distance from y to a point with x_m = t (inf when no such point exists).
  MG_HD double g(double t) const {
    const double U = t - delta;
    if (U < 0.0) return INFINITY;
    double F = 0.0, sz = 0.0;
    for (int p = 0; p < K; ++p) {
      if (p == pm) continue;
      const double v = ys[p], z = v < U ? v : U;
      F += v - z;
      sz += z;
    }
    const double D = (1.0 - t) - sz;
    if (D > (double)(K - 1) * U - sz + 1e-15) return INFINITY;  // not enough room below U
    return fabs(ym - t) + F + fabs(D);
  }

  MG_HD double cap(int p, double U) const { return ys[p] < U ? U - ys[p] : 0.0; }
  MG_HD double mass(int p, double U) const { return ys[p] < U ? ys[p] : U; }

  // f(t) and where the greedy stopped; f = inf when t is infeasible.
  MG_HD MgGreedy greedy(double t) const {
    MgGreedy r{INFINITY, 0, K - 1, 0.0, 0.0};
    const double U = t - delta;
    if (U < 0.0) return r;
    double F = 0.0, sz = 0.0, obj = cs[pm] * t;
    for (int p = 0; p < K; ++p) {
      if (p == pm) continue;
      const double v = ys[p], z = v < U ? v : U;
      F += v - z;
      sz += z;
      obj += cs[p] * z;
    }
    const double D = (1.0 - t) - sz;
    const double R = eps - fabs(ym - t) - F - fabs(D);
    if (R < 0.0) return r;
    int ir = 0, id = K - 1;
    double rused = 0.0, dused = 0.0;
    // forced: receivers ascending c
    double need = D > 0.0 ? D : 0.0;
    while (need > 0.0 && ir < K) {
      const double room = ir == pm ? 0.0 : cap(ir, U) - rused;
      if (room >= need) {
        rused += need;
        obj += cs[ir] * need;
        need = 0.0;
      } else {
        if (room > 0.0) {
          obj += cs[ir] * room;
          need -= room;
        }
        ++ir;
        rused = 0.0;
      }
    }
    if (need > 1e-12) return r;
    // forced: donors descending c
    need = D < 0.0 ? -D : 0.0;
    while (need > 0.0 && id >= 0) {
      const double have = id == pm ? 0.0 : mass(id, U) - dused;
      if (have >= need) {
        dused += need;
        obj -= cs[id] * need;
        need = 0.0;
      } else {
        if (have > 0.0) {
          obj -= cs[id] * have;
          need -= have;
        }
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
      while (ir < id && (ir == pm || cap(ir, U) - rused <= 0.0)) {
        ++ir;
        rused = 0.0;
      }
      while (id > ir && (id == pm || mass(id, U) - dused <= 0.0)) {
        --id;
        dused = 0.0;
      }
      if (ir >= id || !(cs[id] > cs[ir])) break;
      double a = cap(ir, U) - rused;
      const double b = mass(id, U) - dused;
      if (b < a) a = b;
      if (v < a) a = v;
      rused += a;
      dused += a;
      v -= a;
      obj += (cs[ir] - cs[id]) * a;
    }
    r.f = obj;
    r.ir = ir;
    r.id = id;
    r.rused = rused;
    r.dused = dused;
    return r;
  }

  // x at t from the greedy's stopping point, into out [K] at the classes `order` names (one
  // rounding per entry); returns Σ c x.
  template <typename out_t>
  MG_HD double write(double t, const MgGreedy& s, const int64_t* order, out_t* out) const {
    const double U = t - delta;
    double obj = 0.0;
    for (int p = 0; p < K; ++p) {
      double x;
      if (p == pm) {
        x = t;
      } else {
        x = ys[p] < U ? ys[p] : U;
        if (p < s.ir) x = U;
        else if (p == s.ir) x += s.rused;
        if (p > s.id) x = 0.0;
        else if (p == s.id) x -= s.dused;
        if (x < 0.0) x = 0.0;
      }
      obj += cs[p] * x;
      out[order[p]] = (out_t)x;
    }
    return obj;
  }

  // f(t) where feasible, else kMgPenalty + g(t): quasi-convex on [lo, 1] (the feasible t form
  // an interval around argmin g, and g grows away from it), so one golden-section search finds
  // the minimum of f without locating the interval's ends first.
  MG_HD double penalised(double t) const {
    const double f = greedy(t).f;
    if (f < INFINITY) return f;
    const double gt = g(t);
    return kMgPenalty + (gt < kMgPenalty ? gt : kMgPenalty);
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
  for (int i = 0; i < kMgGoldenIters && b - a > kMgTTol; ++i) {
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

struct MgG {
  const MgRow* r;
  MG_HD double operator()(double t) const { return r->g(t); }
};
struct MgH {
  const MgRow* r;
  MG_HD double operator()(double t) const { return r->penalised(t); }
};

// Solves one row: y [K] and, from the caller, order [K] (classes by ascending c = log(y + offset),
// ties by index) with ys, cs [K] (y as double and c in that order). Writes x [K] to out,
// returns Σ c x (of the float64 x) and sets *feasible; infeasible rows get x = y.
template <typename scalar_t>
MG_HD double mg_solve_row(const scalar_t* y, const int64_t* order, const double* ys, const double* cs, int K,
                          double eps, double delta, scalar_t* out, bool* feasible) {
  int m = 0;
  for (int j = 1; j < K; ++j)
    if ((double)y[j] > (double)y[m]) m = j;
  int pm = 0;
  while (pm < K - 1 && (int)order[pm] != m) ++pm;
  MgRow row{ys, cs, K, pm, (double)y[m], eps + kMgBudgetTol, delta};
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
      t0 = mg_golden(lo, hi, MgG{&row}, &gmin);
    }
    ok = row.g(t0) <= row.eps;
  }
  if (!ok) {
    double obj = 0.0;
    for (int p = 0; p < K; ++p) obj += cs[p] * ys[p];
    for (int j = 0; j < K; ++j) out[j] = y[j];
    *feasible = false;
    return obj;
  }
  double fbest;
  double t = mg_golden(lo, hi, MgH{&row}, &fbest);
  MgGreedy s = row.greedy(t);
  if (!(s.f < INFINITY)) {  // a feasible set too narrow for the search to land in: t0 is in it
    t = t0;
    s = row.greedy(t);
  }
  *feasible = true;
  return row.write(t, s, order, out);
}

}  // namespace ppoison
