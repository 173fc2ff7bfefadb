// Euclidean projections of each row v [B, K] → [B, K] (CUDA twin of projection_cpu.cpp):
//   simplex(s): argmin ‖x − v‖₂ s.t. x ≥ 0, Σx = s;  x = max(v − τ, 0)
//   l1 ball(s): v if ‖v‖₁ ≤ s, else sign(v) ⊙ simplex_s(|v|)
// τ by Michelot's algorithm (1986), in double: with u = v (simplex) or |v| (l1) and the
// active set A = all k, repeat τ = (Σ_A u − s)/|A| and drop the k ∈ A with u_k ≤ τ until
// nothing is dropped. τ only grows, so A = {u > the last τ} and no per-element state is kept.
// A warp per row b: lanes stride over k; sums and counts are shuffle-reduced. The feasibility
// test (rows returned unchanged) sums the row sequentially on lane 0, in the CPU kernel's order.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "../ops.h"
#include "../utils.h"
#include "utils.cuh"

namespace ppoison {

namespace {

template <typename scalar_t, bool L1>
__device__ __forceinline__ double u_of(const scalar_t* v, int k) {
  const double x = (double)v[k];
  return L1 ? fabs(x) : x;
}

// τ with Σ max(u − τ, 0) = s; Σ_k u_k = sum_u.
template <typename scalar_t, bool L1>
__device__ double michelot_tau(const scalar_t* v, int K, double s, double sum_u, int lane) {
  int n = K;
  double tau = (sum_u - s) / n;
  double thr = -INFINITY;  // A = {u > thr}
  while (tau > thr) {      // else no u ∈ A is ≤ τ: done
    thr = tau;
    double S = 0.0;
    int cnt = 0;
    for (int k = lane; k < K; k += WARP_SIZE) {
      const double u = u_of<scalar_t, L1>(v, k);
      if (u > thr) {
        S += u;
        ++cnt;
      }
    }
    S = warp_sum(S);
    cnt = warp_sum(cnt);
    // cnt == n: nothing dropped. cnt == 0 (s negligible next to the u's, rounding): keep τ.
    if (cnt == n || cnt == 0) break;
    n = cnt;
    tau = (S - s) / n;
  }
  return tau;
}

template <typename scalar_t, bool L1>
__global__ void project_kernel(const scalar_t* __restrict__ v, scalar_t* __restrict__ out, int64_t B, int K,
                               double radius) {
  const int lane = lane_id();
  for (int64_t b = warp_row0(); b < B; b += warp_row_stride()) {
    const scalar_t* vr = v + b * K;
    scalar_t* o = out + b * K;
    bool nonneg = true;
    double sum_u = 0.0;
    for (int k = lane; k < K; k += WARP_SIZE) {
      nonneg &= (double)vr[k] >= 0.0;
      sum_u += u_of<scalar_t, L1>(vr, k);
    }
    nonneg = warp_all(nonneg);
    sum_u = warp_sum(sum_u);
    // Already feasible: the reference returns v unchanged. Sequential sums, as on the CPU,
    // so the exact comparisons decide the same way.
    double sum = 0.0, abs_sum = 0.0;
    if (lane == 0) {
      for (int k = 0; k < K; ++k) {
        const double x = (double)vr[k];
        sum += x;
        abs_sum += fabs(x);
      }
    }
    const bool feasible = warp_broadcast((int)((L1 && abs_sum <= radius) || (!L1 && nonneg && sum == radius)), 0);
    if (feasible) {
      for (int k = lane; k < K; k += WARP_SIZE) o[k] = vr[k];
      continue;
    }
    const double tau = michelot_tau<scalar_t, L1>(vr, K, radius, sum_u, lane);
    for (int k = lane; k < K; k += WARP_SIZE) {
      const double x = u_of<scalar_t, L1>(vr, k) - tau;
      const double m = x > 0.0 ? x : 0.0;
      o[k] = (scalar_t)(L1 && vr[k] < 0 ? -m : m);
    }
  }
}

at::Tensor project_impl(const at::Tensor& v_, double radius, bool l1) {
  check_float(v_, "v");
  check_dim(v_, 2, "v", "[B, K]");
  TORCH_CHECK_VALUE(v_.size(1) >= 1, "ppoison: v must have at least one column, got shape ", v_.sizes());
  TORCH_CHECK_VALUE(std::isfinite(radius) && radius > 0.0, "ppoison: radius must be finite and > 0, got ", radius);
  check_cuda_inputs({{v_, "v"}});
  const c10::cuda::CUDAGuard guard(v_.device());
  auto v = v_.contiguous();
  auto out = at::empty_like(v);
  if (v.size(0) == 0) return out;
  check_values({{v, "v", ValueCheck::Finite}});
  const int64_t B = v.size(0), K = v.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "project_cuda", [&] {
    if (l1) {
      project_kernel<scalar_t, true><<<WARP_BLOCKS(B), THREADS, 0, stream>>>(
          v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, (int)K, radius);
    } else {
      project_kernel<scalar_t, false><<<WARP_BLOCKS(B), THREADS, 0, stream>>>(
          v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, (int)K, radius);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

at::Tensor project_simplex_cuda(const at::Tensor& v, double radius) { return project_impl(v, radius, false); }

at::Tensor project_l1_ball_cuda(const at::Tensor& v, double radius) { return project_impl(v, radius, true); }

TORCH_LIBRARY_IMPL(ppoison, CUDA, m) {
  m.impl("project_simplex", &project_simplex_cuda);
  m.impl("project_l1_ball", &project_l1_ball_cuda);
}

}  // namespace ppoison
