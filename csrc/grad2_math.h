// GRAD² allocation math shared by the CPU and CUDA kernels (host + device).
//
// Per sample, p ∈ Δ_K (the victim posterior), coefficients c ∈ R^K, budgets ε_e:
//   receiver r = argmin c (lowest index among equal minima);
//   donors     = the classes ≠ r in descending order of c (equal c: lowest index first);
//   G_e        = min(1 − p_r, ε_e / 2);
//   S_d        = exclusive cumulative sum of p along the donor order;
//   take_d     = clamp(G_e − S_d, 0, p_d);  x = p − take;  x_r = p_r + Σ take;
//   ỹ_e        = clamp(x, 1e-15, 1) / Σ clamp(x, 1e-15, 1).
// The exact LP optimum of min cᵀx on {x ∈ Δ_K, ‖x − p‖₁ ≤ ε} (GRAD², Mazeika et al. 2022),
// without the original's np.isclose early stop. Everything in double, rounded once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define G2_HD __host__ __device__ __forceinline__
#else
#define G2_HD inline
#endif

namespace ppoison {

constexpr double kGrad2Floor = 1e-15;  // GR: clamp(x, 1e-15, 1) before renormalising

// Whether class a is visited before class b as a donor (a total order).
template <typename scalar_t>
G2_HD bool grad2_donor_before(const scalar_t* c, int a, int b) {
  return c[a] > c[b] || (c[a] == c[b] && a < b);
}

template <typename scalar_t>
G2_HD int grad2_receiver(const scalar_t* c, int K) {
  int r = 0;
  for (int k = 1; k < K; ++k)
    if (c[k] < c[r]) r = k;
  return r;
}

// order[0 .. K−2] ← the donors of one row, in visiting order.
template <typename scalar_t>
G2_HD void grad2_donor_order(const scalar_t* c, int K, int r, int* order) {
  int n = 0;
  for (int k = 0; k < K; ++k)
    if (k != r) order[n++] = k;
#if defined(__CUDA_ARCH__)
  for (int i = 1; i < n; ++i) {  // insertion sort: one thread per row, no allocation
    const int v = order[i];
    int j = i - 1;
    while (j >= 0 && grad2_donor_before(c, v, order[j])) {
      order[j + 1] = order[j];
      --j;
    }
    order[j + 1] = v;
  }
#else
  std::sort(order, order + n, [c](int a, int b) { return grad2_donor_before(c, a, b); });
#endif
}

G2_HD double grad2_clamp(double v) { return v < kGrad2Floor ? kGrad2Floor : (v > 1.0 ? 1.0 : v); }

// One row, all E budgets: out[e·K + k] = ỹ_e[k]. `order` is scratch for K − 1 ints.
template <typename scalar_t>
G2_HD void grad2_allocate_row(const scalar_t* p, const scalar_t* c, int K, const double* eps, int E, int* order,
                              scalar_t* out) {
  const int r = grad2_receiver(c, K);
  grad2_donor_order(c, K, r, order);
  const double pr = (double)p[r];
  for (int e = 0; e < E; ++e) {
    const double half = 0.5 * eps[e];
    const double G = (1.0 - pr) < half ? (1.0 - pr) : half;
    // pass 1: the normaliser; pass 2: the same walk, written out
    double total = 0.0, moved = 0.0, S = 0.0;
    for (int i = 0; i < K - 1; ++i) {
      const int d = order[i];
      const double pd = (double)p[d];
      double take = G - S;
      take = take < 0.0 ? 0.0 : (take > pd ? pd : take);
      S += pd;
      moved += take;
      total += grad2_clamp(pd - take);
    }
    total += grad2_clamp(pr + moved);
    scalar_t* o = out + (int64_t)e * K;
    S = 0.0;
    for (int i = 0; i < K - 1; ++i) {
      const int d = order[i];
      const double pd = (double)p[d];
      double take = G - S;
      take = take < 0.0 ? 0.0 : (take > pd ? pd : take);
      S += pd;
      o[d] = (scalar_t)(grad2_clamp(pd - take) / total);
    }
    o[r] = (scalar_t)(grad2_clamp(pr + moved) / total);
  }
}

}  // namespace ppoison
