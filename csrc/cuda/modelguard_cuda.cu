// ModelGuard-W's exact batched solver (CUDA twin of modelguard_cpu.cpp), y [B, K] →
// (x [B, K], Σ c·x [B], feasible [B]) with c = log(y + offset): per row the 1-D convex search
// of modelguard_math.h (mg_solve_row). A thread per row b; the sort by c is ATen's.

#include "../modelguard_args.h"
#include "../modelguard_math.h"
#include "../ops.h"
#include "utils.cuh"

namespace ppoison {

namespace {

template <typename scalar_t>
__global__ void modelguard_w_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ order,
                                    const double* __restrict__ ys, const double* __restrict__ cs,
                                    scalar_t* __restrict__ out,
                                    scalar_t* __restrict__ obj, bool* __restrict__ feas, int64_t B, int K, double eps,
                                    double margin) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride()) {
    bool ok = false;
    obj[b] = (scalar_t)mg_solve_row(y + b * K, order + b * K, ys + b * K, cs + b * K, K, eps, margin,
                                      out + b * K, &ok);
    feas[b] = ok;
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> modelguard_w_solve_cuda(const Tensor& y_, double epsilon,
                                                                       double margin, double log_offset) {
  check_modelguard_w_args(y_, epsilon, margin, log_offset);
  check_cuda_inputs({{y_, "y"}});
  const torch::stable::accelerator::DeviceGuard guard(y_.get_device_index());
  ModelguardWCall c = modelguard_w_prepare(y_, epsilon, margin, log_offset);
  const int64_t B = c.y.size(0), K = c.y.size(1);
  if (B == 0) return {c.out, c.obj, c.feas};
  const cudaStream_t stream = current_stream(guard);
  constexpr int max_threads = 128;  // a thread per row: small blocks keep more SMs busy
  const RowLaunch launch = row_launch(guard, B, max_threads);
  PPOISON_DISPATCH_FLOATING_TYPES(c.y.scalar_type(), "modelguard_w_solve_cuda", [&] {
    modelguard_w_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(
        c.y.mutable_data_ptr<scalar_t>(), c.order.mutable_data_ptr<int64_t>(), c.ys.mutable_data_ptr<double>(), c.cs.mutable_data_ptr<double>(),
        c.out.mutable_data_ptr<scalar_t>(), c.obj.mutable_data_ptr<scalar_t>(), c.feas.mutable_data_ptr<bool>(), B, (int)K, epsilon,
        margin);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c.out, c.obj, c.feas};
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("modelguard_w_solve", TORCH_BOX(&modelguard_w_solve_cuda)); }

}  // namespace ppoison
