// ModelGuard-W's exact batched solver (modelguard_math.h), y [B, K] → (x [B, K], Σ c·x [B],
// feasible [B]): per row, minimise Σ c_j x_j with c = log(y + offset) over the simplex, inside
// the L1 ball ‖x − y‖₁ ≤ ε, keeping x_m − x_j ≥ margin for the first argmax m of y.
// One task per row.

#include "../modelguard_args.h"
#include "../modelguard_math.h"
#include "../ops.h"

namespace ppoison {

std::tuple<Tensor, Tensor, Tensor> modelguard_w_solve_cpu(const Tensor& y_, double epsilon,
                                                                      double margin, double log_offset) {
  ModelguardWCall c = modelguard_w_prepare(y_, epsilon, margin, log_offset);
  const int64_t B = c.y.size(0), K = c.y.size(1);
  if (B == 0) return {c.out, c.obj, c.feas};
  PPOISON_DISPATCH_FLOATING_TYPES(c.y.scalar_type(), "modelguard_w_solve_cpu", [&] {
    const scalar_t* yp = c.y.const_data_ptr<scalar_t>();
    const int64_t* orp = c.order.const_data_ptr<int64_t>();
    const double* ysp = c.ys.const_data_ptr<double>();
    const double* csp = c.cs.const_data_ptr<double>();
    scalar_t* op = c.out.mutable_data_ptr<scalar_t>();
    scalar_t* objp = c.obj.mutable_data_ptr<scalar_t>();
    bool* fp = c.feas.mutable_data_ptr<bool>();
    torch::stable::parallel_for(0, B, std::max<int64_t>(1, 64 / K), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        bool ok = false;
        const double o = mg_solve_row(yp + b * K, orp + b * K, ysp + b * K, csp + b * K, (int)K, epsilon, margin,
                                      op + b * K, &ok);
        objp[b] = (scalar_t)o;
        fp[b] = ok;
      }
    });
  });
  return {c.out, c.obj, c.feas};
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CPU, m) { m.impl("modelguard_w_solve", TORCH_BOX(&modelguard_w_solve_cpu)); }

}  // namespace ppoison
