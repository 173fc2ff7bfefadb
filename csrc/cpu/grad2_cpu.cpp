// GRAD²'s allocation step: p, c [B, K], budgets ε [E] → ỹ [B, E, K] (formula in grad2_math.h).
// One task per row: its donor order (grad2_row_order, one std::sort), then an O(K) walk per
// budget (grad2_allocate_budget, the code the CUDA kernel runs).

#include <atomic>
#include <vector>

#include "../grad2_checks.h"
#include "../grad2_math.h"
#include "../ops.h"

namespace ppoison {

Tensor grad2_allocate_cpu(const Tensor& p_, const Tensor& c_, torch::headeronly::HeaderOnlyArrayRef<double> epsilons) {
  check_grad2_args(p_, c_, epsilons);
  const int64_t B = p_.size(0), K = p_.size(1), E = (int64_t)epsilons.size();
  auto p = as_contiguous(p_);
  auto c = as_contiguous(c_);
  auto out = new_tensor(p, {B, E, K});
  if (B == 0) return out;
  std::atomic<bool> bad_p{false}, bad_c{false};
  const std::vector<double> eps(epsilons.begin(), epsilons.end());
  PPOISON_DISPATCH_FLOATING_TYPES(p.scalar_type(), "grad2_allocate_cpu", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B, std::max<int64_t>(1, 65536 / (K * (E + 2))), [&](int64_t b0, int64_t b1) {
      std::vector<int> order((size_t)K);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* pr = pp + b * K;
        const scalar_t* cr = cp + b * K;
        bool ok_p = true, ok_c = true;
        for (int64_t k = 0; k < K; ++k) {
          ok_p &= std::isfinite((double)pr[k]);
          ok_c &= std::isfinite((double)cr[k]);
        }
        if (!ok_p) bad_p = true;
        if (!ok_c) bad_c = true;
        scalar_t* o = op + b * E * K;
        if (!(ok_p && ok_c)) {
          for (int64_t i = 0; i < E * K; ++i) o[i] = scalar_t(0);
          continue;
        }
        const int r = grad2_receiver(cr, (int)K);
        grad2_row_order(cr, (int)K, order.data());
        for (int64_t e = 0; e < E; ++e) grad2_allocate_budget(pr, order.data(), (int)K, r, eps[e], o + e * K);
      }
    });
  });
  report_nonfinite(bad_p, "p");
  report_nonfinite(bad_c, "c");
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CPU, m) { m.impl("grad2_allocate", TORCH_BOX(&grad2_allocate_cpu)); }

}  // namespace ppoison
