// The reference's line search toward the target vertex (CUDA twin of mad_step_cpu.cpp),
// per sample, y, y* [B, K] → ỹ [B, K]:
//   ỹ = (1 − α) y + α y*
//   l1/l2: α = clamp(ε / (‖y − y*‖_p + 1e-7), 0, 1)
//   kl:    α = 1 if KL(y‖y*) ≤ ε, else the last feasible midpoint of a
//          `kl_steps`-step bisection on KL(y‖ỹ(α)) ≤ ε over [0, 1] (0 if none).
// A warp per row b: step_alpha / kl_to_mix of mad_math.h with the sums over k split across
// lanes (double) and shuffle-reduced, so every lane holds the same α; lanes then write ỹ.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../ops.h"
#include "../utils.h"
#include "utils.cuh"

namespace ppoison {

namespace {

// kl_to_mix over the warp: KL(y ‖ (1−α) y + α y*), 0·log 0 = 0, +inf where y_k > 0 = h_k.
template <typename scalar_t>
__device__ double warp_kl_to_mix(const scalar_t* y, const scalar_t* ys, int K, double alpha, int lane) {
  double acc = 0.0;
  bool inf = false;
  for (int k = lane; k < K; k += WARP_SIZE) {
    const double yk = (double)y[k];
    if (yk <= 0.0) continue;
    const double h = (1.0 - alpha) * yk + alpha * (double)ys[k];
    if (!(h > 0.0)) {
      inf = true;
      break;
    }
    acc += yk * (log(yk) - log(h));
  }
  if (warp_any(inf)) return INFINITY;
  return warp_sum(acc);
}

// step_alpha (mad_math.h) over the warp, branch for branch; keep the two in sync.
// The result is the same in every lane.
template <typename scalar_t>
__device__ double warp_step_alpha(const scalar_t* y, const scalar_t* ys, int K, double eps, YDist dist,
                                  int kl_steps, int lane) {
  if (dist == YDist::KL) {
    if (eps <= 0.0) return 0.0;  // ε = 0 stays at y
    if (warp_kl_to_mix(y, ys, K, 1.0, lane) <= eps) return 1.0;
    double lo = 0.0, hi = 1.0, alpha = 0.0;
    for (int i = 0; i < kl_steps; ++i) {
      const double mid = 0.5 * (lo + hi);
      if (warp_kl_to_mix(y, ys, K, mid, lane) <= eps) {
        lo = mid;
        alpha = mid;
      } else {
        hi = mid;
      }
    }
    return alpha;
  }
  double norm = 0.0;
  for (int k = lane; k < K; k += WARP_SIZE) {
    const double d = (double)y[k] - (double)ys[k];
    norm += dist == YDist::L1 ? fabs(d) : d * d;
  }
  norm = warp_sum(norm);
  if (dist == YDist::L2) norm = sqrt(norm);
  const double alpha = eps / (norm + kAlphaEps);
  return alpha < 0.0 ? 0.0 : (alpha > 1.0 ? 1.0 : alpha);
}

template <typename scalar_t>
__global__ void step_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ ys,
                            scalar_t* __restrict__ out, int64_t B, int K, double eps, YDist dist, int kl_steps) {
  const int lane = lane_id();
  for (int64_t b = warp_row0(); b < B; b += warp_row_stride()) {
    const scalar_t* yr = y + b * K;
    const scalar_t* sr = ys + b * K;
    // One α per row: lane 0's, so the row is written with a single step size.
    const double alpha = warp_broadcast(warp_step_alpha(yr, sr, K, eps, dist, kl_steps, lane), 0);
    scalar_t* o = out + b * K;
    for (int k = lane; k < K; k += WARP_SIZE)
      o[k] = mix_entry(yr[k], sr[k], alpha);
  }
}

}  // namespace

at::Tensor mad_step_cuda(const at::Tensor& y_, const at::Tensor& ys_, double epsilon, c10::string_view ydist_s,
                         int64_t kl_steps) {
  check_step_args(y_, ys_, epsilon, kl_steps);
  const YDist dist = parse_ydist(ydist_s);
  check_cuda_inputs({{y_, "y"}, {ys_, "y_star"}});
  const c10::cuda::CUDAGuard guard(y_.device());
  const int64_t B = y_.size(0), K = y_.size(1);
  auto y = y_.contiguous();
  auto ys = ys_.contiguous();
  auto out = at::empty({B, K}, y.options());
  if (B == 0) return out;
  check_values({{y, "y", ValueCheck::Finite}, {ys, "y_star", ValueCheck::Finite}});
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_step_cuda", [&] {
    step_kernel<scalar_t><<<WARP_BLOCKS(B), THREADS, 0, stream>>>(y.data_ptr<scalar_t>(), ys.data_ptr<scalar_t>(),
                                                                  out.data_ptr<scalar_t>(), B, (int)K, epsilon, dist,
                                                                  (int)kl_steps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("mad_step", &mad_step_cuda); }

}  // namespace ppoison
