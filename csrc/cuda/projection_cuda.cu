// Euclidean projections of each row v [B, K] → [B, K] onto the simplex {x ≥ 0, Σx = s} and
// the l1 ball {‖x‖₁ ≤ s} (CUDA launcher of project_row in projection.h, as projection_cpu.cpp).
// One thread per row b (row_launch).

#include "../ops.h"
#include "../projection.h"
#include "../utils.h"
#include "utils.cuh"

namespace ppoison {

namespace {

// Rows are checked finite before the launch, so project_row always writes.
template <typename scalar_t>
__global__ void project_kernel(const scalar_t* __restrict__ v, scalar_t* __restrict__ out, int64_t B, int K,
                               double radius, bool l1) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride()) project_row(v + b * K, K, radius, l1, out + b * K);
}

Tensor project_impl(const Tensor& v_, double radius, bool l1) {
  check_project_args(v_, radius);
  check_cuda_inputs({{v_, "v"}});
  const torch::stable::accelerator::DeviceGuard guard(v_.get_device_index());
  auto v = as_contiguous(v_);
  auto out = new_tensor(v, {v.size(0), v.size(1)});
  const int64_t B = v.size(0), K = v.size(1);
  if (B == 0) return out;
  check_values({{v, "v", ValueCheck::Finite}});
  const cudaStream_t stream = current_stream(guard);
  const RowLaunch launch = row_launch(guard, B);
  PPOISON_DISPATCH_FLOATING_TYPES(v.scalar_type(), "project_cuda", [&] {
    project_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(v.mutable_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                               B, (int)K, radius, l1);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

Tensor project_simplex_cuda(const Tensor& v, double radius) { return project_impl(v, radius, false); }

Tensor project_l1_ball_cuda(const Tensor& v, double radius) { return project_impl(v, radius, true); }

STABLE_TORCH_LIBRARY_IMPL(ppoison, CUDA, m) {
  m.impl("project_simplex", TORCH_BOX(&project_simplex_cuda));
  m.impl("project_l1_ball", TORCH_BOX(&project_l1_ball_cuda));
}

}  // namespace ppoison
