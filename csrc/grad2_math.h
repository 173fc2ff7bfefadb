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
//
// The donor order is given to the walk, not sorted in it: `order` holds all K classes sorted by
// grad2_donor_before (c descending, equal c lowest index first; the receiver is among them and
// the walk skips it). That order is exactly a stable descending sort of c with −0.0 read as +0.0
// (== does not tell them apart), so the backends make it as suits them, O(K log K) a row:
//   CPU:  per row, std::sort with grad2_donor_before (grad2_row_order);
//   CUDA: one ATen stable sort of the whole batch (grad2_cuda.cu; no sort on a device thread).
// The walk (grad2_allocate_budget) is one budget of one row, O(K): the CPU loops over the budgets,
// the CUDA kernel runs a thread per (row, budget). Both run this code, so the CPU tests check it.
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

// order[0 .. K−1] ← the K classes of one row in donor order (host only: the CUDA path sorts the
// batch with ATen instead).
template <typename scalar_t, typename index_t>
inline void grad2_row_order(const scalar_t* c, int K, index_t* order) {
  for (int k = 0; k < K; ++k) order[k] = (index_t)k;
  std::sort(order, order + K, [c](index_t a, index_t b) { return grad2_donor_before(c, (int)a, (int)b); });
}

G2_HD double grad2_clamp(double v) { return v < kGrad2Floor ? kGrad2Floor : (v > 1.0 ? 1.0 : v); }

// One row, one budget ε: out[k] = ỹ[k] (K entries). `order`: the row's K classes in donor order
// (grad2_row_order, or the CUDA path's batch sort); r: its receiver (grad2_receiver).
template <typename scalar_t, typename index_t>
G2_HD void grad2_allocate_budget(const scalar_t* p, const index_t* order, int K, int r, double eps,
                                 scalar_t* out) {
  const double pr = (double)p[r];
  const double half = 0.5 * eps;
  const double G = (1.0 - pr) < half ? (1.0 - pr) : half;
  // pass 1: the normaliser; pass 2: the same walk, written out
  double total = 0.0, moved = 0.0, S = 0.0;
  for (int i = 0; i < K; ++i) {
    const int d = (int)order[i];
    if (d == r) continue;
    const double pd = (double)p[d];
    double take = G - S;
    take = take < 0.0 ? 0.0 : (take > pd ? pd : take);
    S += pd;
    moved += take;
    total += grad2_clamp(pd - take);
  }
  total += grad2_clamp(pr + moved);
  S = 0.0;
  for (int i = 0; i < K; ++i) {
    const int d = (int)order[i];
    if (d == r) continue;
    const double pd = (double)p[d];
    double take = G - S;
    take = take < 0.0 ? 0.0 : (take > pd ? pd : take);
    S += pd;
    out[d] = (scalar_t)(grad2_clamp(pd - take) / total);
  }
  out[r] = (scalar_t)(grad2_clamp(pr + moved) / total);
}

}  // namespace ppoison
