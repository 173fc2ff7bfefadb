// MAD objective values of a perturbed posterior ỹ [B, K] against y [B, K] (CUDA launcher of
// objective_fc / objective_dense in mad_math.h, as mad_objective_cpu.cpp), per sample:
//   obj [B] = ‖Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖‖²,  surrogate [B] = ‖Gᵀ(ỹ − y)‖²
// from the FC/identity Gram (p [B, K], ‖h‖² [B]) or a dense Gram M [B, K, K].
// One thread per row b (row_launch).

#include "../mad_math.h"
#include "../ops.h"
#include "../utils.h"
#include "utils.cuh"

namespace ppoison {

namespace {

template <typename scalar_t>
__global__ void objective_fc_kernel(const scalar_t* __restrict__ yt, const scalar_t* __restrict__ y,
                                    const scalar_t* __restrict__ p, const scalar_t* __restrict__ hsq,
                                    scalar_t* __restrict__ obj, scalar_t* __restrict__ sur, int64_t B, int K) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride()) {
    double o = 0.0, s = 0.0;
    objective_fc(yt + b * K, y + b * K, p ? p + b * K : nullptr, hsq ? (double)hsq[b] : 1.0, K, &o, &s);
    obj[b] = (scalar_t)o;
    sur[b] = (scalar_t)s;
  }
}

template <typename scalar_t>
__global__ void objective_dense_kernel(const scalar_t* __restrict__ yt, const scalar_t* __restrict__ y,
                                       const scalar_t* __restrict__ M, scalar_t* __restrict__ obj,
                                       scalar_t* __restrict__ sur, int64_t B, int K) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride()) {
    double o = 0.0, s = 0.0;
    objective_dense(yt + b * K, y + b * K, M + b * (int64_t)K * K, K, &o, &s);
    obj[b] = (scalar_t)o;
    sur[b] = (scalar_t)s;
  }
}

}  // namespace

std::tuple<Tensor, Tensor> mad_objective_cuda(const Tensor& yt_, const Tensor& y_,
                                                      const OptTensor& p_,
                                                      const OptTensor& hsq_,
                                                      const OptTensor& gram_) {
  const ObjectiveCall c = objective_call(yt_, y_, p_, hsq_, gram_);
  const GramArgs& ga = c.gram;
  check_cuda_inputs({{c.y, "y"}, {c.yt, "y_tilde"}, {ga.p, "p"}, {ga.hsq, "h_sqnorm"}, {ga.gram, "gram"}});
  const torch::stable::accelerator::DeviceGuard guard(c.y.get_device_index());
  const Tensor &y = c.y, &yt = c.yt, &obj = c.obj, &sur = c.sur;
  const int64_t B = y.size(0), K = y.size(1);
  if (B == 0) return {obj, sur};
  check_values({{y, "y", ValueCheck::Finite},
                {yt, "y_tilde", ValueCheck::Finite},
                {ga.p, "p", ValueCheck::Finite},
                {ga.gram, "gram", ValueCheck::Finite},
                {ga.hsq, "h_sqnorm", ValueCheck::FiniteNonneg}});
  const cudaStream_t stream = current_stream(guard);
  const RowLaunch launch = row_launch(guard, B);
  PPOISON_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_objective_cuda", [&] {
    if (ga.dense) {
      objective_dense_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(
          yt.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), ga.gram.mutable_data_ptr<scalar_t>(), obj.mutable_data_ptr<scalar_t>(),
          sur.mutable_data_ptr<scalar_t>(), B, (int)K);
    } else {
      objective_fc_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(
          yt.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), ga.p.defined() ? ga.p.mutable_data_ptr<scalar_t>() : nullptr,
          ga.hsq.defined() ? ga.hsq.mutable_data_ptr<scalar_t>() : nullptr, obj.mutable_data_ptr<scalar_t>(),
          sur.mutable_data_ptr<scalar_t>(), B, (int)K);
    }
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {obj, sur};
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("mad_objective", TORCH_BOX(&mad_objective_cuda)); }

}  // namespace ppoison
