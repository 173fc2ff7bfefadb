// Euclidean projections of each row v [B, K] → [B, K] onto the simplex {x ≥ 0, Σx = s} and
// the l1 ball {‖x‖₁ ≤ s} (CUDA launcher of project_row in projection.h, as projection_cpu.cpp).
// One thread per row b.
#include <ATen/Dispatch.h>
#include <torch/library.h>

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

at::Tensor project_impl(const at::Tensor& v_, double radius, bool l1) {
  check_project_args(v_, radius);
  check_cuda_inputs({{v_, "v"}});
  const c10::cuda::CUDAGuard guard(v_.device());
  auto v = v_.contiguous();
  auto out = at::empty_like(v);
  const int64_t B = v.size(0), K = v.size(1);
  if (B == 0) return out;
  check_values({{v, "v", ValueCheck::Finite}});
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "project_cuda", [&] {
    project_kernel<scalar_t><<<BLOCKS(B), THREADS, 0, stream>>>(v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                               B, (int)K, radius, l1);
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
