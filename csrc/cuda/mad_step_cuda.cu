// The reference's line search toward the target vertex (CUDA launcher of step_row in
// mad_math.h, as mad_step_cpu.cpp), per sample, y, y* [B, K] → ỹ [B, K]:
//   ỹ = (1 − α) y + α y*
//   l1/l2: α = clamp(ε / (‖y − y*‖_p + 1e-7), 0, 1)
//   kl:    α = 1 if KL(y‖y*) ≤ ε, else the last feasible midpoint of a
//          `kl_steps`-step bisection on KL(y‖ỹ(α)) ≤ ε over [0, 1] (0 if none).
// One thread per row b (row_launch).

#include "../mad_math.h"
#include "../ops.h"
#include "../utils.h"
#include "utils.cuh"

namespace ppoison {

namespace {

template <typename scalar_t>
__global__ void step_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ ys,
                            scalar_t* __restrict__ out, int64_t B, int K, double eps, YDist dist, int kl_steps) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride())
    step_row(y + b * K, ys + b * K, K, eps, dist, kl_steps, out + b * K);
}

}  // namespace

Tensor mad_step_cuda(const Tensor& y_, const Tensor& ys_, double epsilon, std::string_view ydist_s,
                         int64_t kl_steps) {
  check_step_args(y_, ys_, epsilon, kl_steps);
  const YDist dist = parse_ydist(ydist_s);
  check_cuda_inputs({{y_, "y"}, {ys_, "y_star"}});
  const torch::stable::accelerator::DeviceGuard guard(y_.get_device_index());
  const int64_t B = y_.size(0), K = y_.size(1);
  auto y = as_contiguous(y_);
  auto ys = as_contiguous(ys_);
  auto out = new_tensor(y, {B, K});
  if (B == 0) return out;
  check_values({{y, "y", ValueCheck::Finite}, {ys, "y_star", ValueCheck::Finite}});
  const cudaStream_t stream = current_stream(guard);
  const RowLaunch launch = row_launch(guard, B);
  PPOISON_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_step_cuda", [&] {
    step_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(y.mutable_data_ptr<scalar_t>(), ys.mutable_data_ptr<scalar_t>(),
                                                            out.mutable_data_ptr<scalar_t>(), B, (int)K, epsilon, dist,
                                                            (int)kl_steps);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("mad_step", TORCH_BOX(&mad_step_cuda)); }

}  // namespace ppoison
