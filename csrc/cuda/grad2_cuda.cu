// GRAD²'s allocation step (CUDA twin of grad2_cpu.cpp): p, c [B, K], budgets ε [E] → ỹ [B, E, K],
// formula in grad2_math.h. A thread per row calling grad2_allocate_row; its donor order lives
// in a [B, K − 1] int scratch buffer; the budgets in a device copy.

#include "../grad2_checks.h"
#include "../grad2_math.h"
#include "../ops.h"
#include "utils.cuh"

namespace ppoison {

namespace {

template <typename scalar_t>
__global__ void grad2_allocate_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ c,
                                      const double* __restrict__ eps, int* __restrict__ order,
                                      scalar_t* __restrict__ out, int64_t B, int K, int E) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride())
    grad2_allocate_row(p + b * K, c + b * K, K, eps, E, order + b * (K - 1), out + b * (int64_t)E * K);
}

}  // namespace

Tensor grad2_allocate_cuda(const Tensor& p_, const Tensor& c_, torch::headeronly::HeaderOnlyArrayRef<double> epsilons) {
  check_grad2_args(p_, c_, epsilons);
  check_cuda_inputs({{p_, "p"}, {c_, "c"}});
  const torch::stable::accelerator::DeviceGuard guard(p_.get_device_index());
  const int64_t B = p_.size(0), K = p_.size(1), E = (int64_t)epsilons.size();
  auto p = as_contiguous(p_);
  auto c = as_contiguous(c_);
  auto out = new_tensor(p, {B, E, K});
  if (B == 0) return out;
  check_values({{p, "p", ValueCheck::Finite}, {c, "c", ValueCheck::Finite}});
  auto eps_host = torch::stable::empty({E}, ScalarType::Double, std::nullopt,
                                      torch::stable::Device(torch::headeronly::DeviceType::CPU));
  std::copy(epsilons.begin(), epsilons.end(), eps_host.mutable_data_ptr<double>());
  auto eps = torch::stable::to(eps_host, p.device());
  auto order = new_tensor(p, {B, K - 1}, ScalarType::Int);
  const cudaStream_t stream = current_stream(guard);
  PPOISON_DISPATCH_FLOATING_TYPES(p.scalar_type(), "grad2_allocate_cuda", [&] {
    grad2_allocate_kernel<scalar_t><<<BLOCKS(B), THREADS, 0, stream>>>(
        p.mutable_data_ptr<scalar_t>(), c.mutable_data_ptr<scalar_t>(), eps.mutable_data_ptr<double>(), order.mutable_data_ptr<int>(),
        out.mutable_data_ptr<scalar_t>(), B, (int)K, (int)E);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("grad2_allocate", TORCH_BOX(&grad2_allocate_cuda)); }

}  // namespace ppoison
