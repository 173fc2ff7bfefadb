// GRAD²'s allocation step (CUDA twin of grad2_cpu.cpp): p, c [B, K], budgets ε [E] → ỹ [B, E, K],
// formula in grad2_math.h. The donor order of every row comes from one ATen stable sort of the
// batch (descending; int64 [B, K]), not from a sort on a device thread; then a thread per
// (row, budget) finds the row's receiver (O(K)) and runs the shared walk grad2_allocate_budget
// (O(K)), the CPU's code, with the budgets in a device copy. Launch: row_launch over B·E.

#include "../grad2_checks.h"
#include "../grad2_math.h"
#include "../ops.h"
#include "utils.cuh"

namespace ppoison {

namespace {

template <typename scalar_t>
__global__ void grad2_allocate_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ c,
                                      const int64_t* __restrict__ order, const double* __restrict__ eps,
                                      scalar_t* __restrict__ out, int64_t B, int K, int E) {
  for (int64_t t = thread_id0(); t < B * E; t += thread_stride()) {
    const int64_t b = t / E;
    const int64_t row = b * K;
    grad2_allocate_budget(p + row, order + row, K, grad2_receiver(c + row, K), eps[t - b * E], out + t * K);
  }
}

// The K classes of each row in donor order (grad2_donor_before): a stable descending sort of c,
// which keeps the lowest index first among equal c. The keys are c − (−0.0) = c + 0.0, which
// turns −0.0 into +0.0 and leaves every other value as it is: grad2_donor_before's == holds
// −0.0 and +0.0 equal, and a sort of the raw c need not (a radix sort orders them by bits).
Tensor grad2_batch_order(const Tensor& c) {
  const Tensor minus_zero = torch::stable::full(torch::headeronly::IntHeaderOnlyArrayRef(), -0.0, c.scalar_type(),
                                                std::nullopt, c.device());
  const Tensor keys = torch::stable::subtract(c, minus_zero);
  const auto sorted = call_aten<2>("aten::sort", "stable", keys, std::optional<bool>(true), int64_t(1), true);
  return as_contiguous(sorted[1]);
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
  Tensor order = grad2_batch_order(c);
  const cudaStream_t stream = current_stream(guard);
  const RowLaunch launch = row_launch(guard, B * E);
  PPOISON_DISPATCH_FLOATING_TYPES(p.scalar_type(), "grad2_allocate_cuda", [&] {
    grad2_allocate_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(
        p.mutable_data_ptr<scalar_t>(), c.mutable_data_ptr<scalar_t>(), order.mutable_data_ptr<int64_t>(),
        eps.mutable_data_ptr<double>(), out.mutable_data_ptr<scalar_t>(), B, (int)K, (int)E);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("grad2_allocate", TORCH_BOX(&grad2_allocate_cuda)); }

}  // namespace ppoison
