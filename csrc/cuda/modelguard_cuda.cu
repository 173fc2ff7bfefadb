// ModelGuard-W's exact batched solver (CUDA twin of modelguard_cpu.cpp), y [B, K] →
// (x [B, K], Σ c·x [B], feasible [B]) with c = log(y + offset): per row the 1-D convex search
// of modelguard_math.h (mg_solve_row). A thread per row b; the sort by c is ATen's.
#include <ATen/Dispatch.h>
#include <torch/library.h>

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> modelguard_w_solve_cuda(const at::Tensor& y_, double epsilon,
                                                                       double margin, double log_offset) {
  check_modelguard_w_args(y_, epsilon, margin, log_offset);
  check_cuda_inputs({{y_, "y"}});
  const c10::cuda::CUDAGuard guard(y_.device());
  const int64_t B = y_.size(0), K = y_.size(1);
  auto y = y_.contiguous();
  auto out = at::empty({B, K}, y.options());
  auto obj = at::empty({B}, y.options());
  auto feas = at::empty({B}, y.options().dtype(at::kBool));
  if (B == 0) return {out, obj, feas};
  check_modelguard_w_values(y);
  auto [order, ys, cs] = modelguard_w_costs(y, log_offset);
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = 128;  // a thread per row: small blocks keep more SMs busy at small B
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "modelguard_w_solve_cuda", [&] {
    modelguard_w_kernel<scalar_t><<<BLOCKS(B, threads), threads, 0, stream>>>(
        y.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), ys.data_ptr<double>(), cs.data_ptr<double>(),
        out.data_ptr<scalar_t>(),
        obj.data_ptr<scalar_t>(), feas.data_ptr<bool>(), B, (int)K, epsilon, margin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, obj, feas};
}

TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("modelguard_w_solve", &modelguard_w_solve_cuda); }

}  // namespace ppoison
