// Euclidean projections of one row v [K], shared by the CPU kernel (torch::stable::parallel_for over rows)
// and the CUDA kernel (a thread per row):
//   simplex(s): argmin ‖x − v‖₂ s.t. x ≥ 0, Σx = s;  x = max(v − τ, 0)
//   l1 ball(s): v if ‖v‖₁ ≤ s, else sign(v) ⊙ simplex_s(|v|)
// τ by Michelot's algorithm (1986) in double, with u = v (simplex) or |v| (l1): for an active
// set A = {u > θ} ⊇ {u > τ*}, τ_A = (Σ_A u − s)/|A| ≤ τ*; repeat θ = τ_A until no u ∈ A is
// ≤ τ_A. It starts from θ = max(max u − s, (Σu − s)/K) ≤ τ* (the largest x is at most s), so
// A begins with the few entries near the top; a small A is kept in a fixed local buffer.
#pragma once

#include <cmath>

#include "mad_math.h"

namespace ppoison {

template <typename scalar_t>
PP_HD double proj_u(const scalar_t* v, int k, bool l1) {
  const double x = (double)v[k];
  return l1 ? fabs(x) : x;
}

constexpr int kActiveBuffer = 32;  // an active set this small is kept and filtered in place

// Σ u and the number of u over {u > thr}, ascending k; the first kActiveBuffer of them go to buf.
template <typename scalar_t>
PP_HD int gather_active(const scalar_t* v, int K, bool l1, double thr, double* buf, double* sum) {
  double S = 0.0;
  int n = 0;
  for (int k = 0; k < K; ++k) {
    const double u = proj_u(v, k, l1);
    if (u > thr) {
      if (n < kActiveBuffer) buf[n] = u;
      S += u;
      ++n;
    }
  }
  *sum = S;
  return n;
}

// The same over the n buffered values, keeping those > thr (in order) at the front.
PP_HD int filter_active(double* buf, int n, double thr, double* sum) {
  double S = 0.0;
  int m = 0;
  for (int i = 0; i < n; ++i) {
    if (buf[i] > thr) {
      buf[m++] = buf[i];
      S += buf[i];
    }
  }
  *sum = S;
  return m;
}

// τ with Σ max(u − τ, 0) = s, given Σu and max u. Once A has at most kActiveBuffer entries the
// passes run over the kept values instead of the row; the sums are the same either way.
template <typename scalar_t>
PP_HD double michelot_tau(const scalar_t* v, int K, bool l1, double s, double sum_u, double max_u) {
  double buf[kActiveBuffer];
  double thr = max_u - s;
  const double mean_lb = (sum_u - s) / K;
  if (mean_lb > thr) thr = mean_lb;
  double S = 0.0;
  int n = gather_active(v, K, l1, thr, buf, &S);
  if (n == 0) return thr;  // s negligible next to max u (rounding): every x rounds to 0
  double tau = (S - s) / n;
  while (tau > thr) {  // else {u > τ} = A: done
    thr = tau;
    const int m = n <= kActiveBuffer ? filter_active(buf, n, thr, &S) : gather_active(v, K, l1, thr, buf, &S);
    if (m == n || m == 0) break;  // nothing dropped (τ stays); m = 0 only by rounding
    n = m;
    tau = (S - s) / n;
  }
  return tau;
}

// Writes the projection of v onto the simplex (l1 = false) or the l1 ball of radius s to out;
// a feasible row is copied unchanged (as the reference does). Returns false, writing nothing,
// when v holds a NaN/Inf.
template <typename scalar_t>
PP_HD bool project_row(const scalar_t* v, int K, double s, bool l1, scalar_t* out) {
  double sum = 0.0, abs_sum = 0.0, max_u = -INFINITY;
  bool nonneg = true, finite = true;
  for (int k = 0; k < K; ++k) {
    const double x = (double)v[k], u = l1 ? fabs(x) : x;
    finite &= x - x == 0.0;  // false for NaN and ±Inf
    sum += x;
    abs_sum += fabs(x);
    nonneg &= x >= 0.0;
    if (u > max_u) max_u = u;
  }
  if (!finite) return false;
  if ((l1 && abs_sum <= s) || (!l1 && nonneg && sum == s)) {
    for (int k = 0; k < K; ++k) out[k] = v[k];
    return true;
  }
  const double tau = michelot_tau(v, K, l1, s, l1 ? abs_sum : sum, max_u);
  for (int k = 0; k < K; ++k) {
    const double x = proj_u(v, k, l1) - tau;
    const double m = x > 0.0 ? x : 0.0;
    out[k] = (scalar_t)(l1 && v[k] < 0 ? -m : m);
  }
  return true;
}

}  // namespace ppoison
