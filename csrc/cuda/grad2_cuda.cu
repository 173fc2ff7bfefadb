// GRAD²'s allocation step (CUDA twin of grad2_cpu.cpp): p, c [B, K], budgets ε [E] → ỹ [B, E, K],
// formula in grad2_math.h. A thread per row calling grad2_allocate_row; its donor order lives
// in a [B, K − 1] int scratch buffer; the budgets in a device copy.
#include <ATen/Dispatch.h>
#include <torch/library.h>

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

at::Tensor grad2_allocate_cuda(const at::Tensor& p_, const at::Tensor& c_, c10::ArrayRef<double> epsilons) {
  check_grad2_args(p_, c_, epsilons);
  check_cuda_inputs({{p_, "p"}, {c_, "c"}});
  const c10::cuda::CUDAGuard guard(p_.device());
  const int64_t B = p_.size(0), K = p_.size(1), E = (int64_t)epsilons.size();
  auto p = p_.contiguous();
  auto c = c_.contiguous();
  auto out = at::empty({B, E, K}, p.options());
  if (B == 0) return out;
  check_values({{p, "p", ValueCheck::Finite}, {c, "c", ValueCheck::Finite}});
  auto eps = at::tensor(std::vector<double>(epsilons.begin(), epsilons.end()), at::kDouble).to(p.device());
  auto order = at::empty({B, K - 1}, p.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "grad2_allocate_cuda", [&] {
    grad2_allocate_kernel<scalar_t><<<BLOCKS(B), THREADS, 0, stream>>>(
        p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), eps.data_ptr<double>(), order.data_ptr<int>(),
        out.data_ptr<scalar_t>(), B, (int)K, (int)E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("grad2_allocate", &grad2_allocate_cuda); }

}  // namespace ppoison
