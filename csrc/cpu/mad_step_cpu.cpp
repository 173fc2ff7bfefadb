// The reference's line search toward the target vertex, per sample:
//   ỹ = (1 − α) y + α y*
//   l1/l2: α = clamp(ε / (‖y − y*‖_p + 1e-7), 0, 1)
//   kl:    α = 1 if KL(y‖y*) ≤ ε, else the last feasible midpoint of a
//          `kl_steps`-step bisection on KL(y‖ỹ(α)) ≤ ε over [0, 1] (0 if none).
// step_row of mad_math.h (shared with CUDA); one task per row.

#include <atomic>

#include "../mad_math.h"
#include "../ops.h"
#include "../utils.h"

namespace ppoison {

Tensor mad_step_cpu(const Tensor& y_, const Tensor& ys_, double epsilon, std::string_view ydist_s,
                        int64_t kl_steps) {
  check_step_args(y_, ys_, epsilon, kl_steps);
  const YDist dist = parse_ydist(ydist_s);
  const int64_t B = y_.size(0), K = y_.size(1);
  auto y = as_contiguous(y_);
  auto ys = as_contiguous(ys_);
  auto out = new_tensor(y, {B, K});
  if (B == 0) return out;
  std::atomic<bool> bad_y{false}, bad_s{false};
  PPOISON_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_step_cpu", [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* sp = ys.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t work = dist == YDist::KL ? K * (kl_steps + 2) : K;
    torch::stable::parallel_for(0, B, std::max<int64_t>(1, 16384 / work), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* yr = yp + b * K;
        const scalar_t* sr = sp + b * K;
        const bool ok_y = finite_row(yr, K), ok_s = finite_row(sr, K);
        if (!ok_y) bad_y = true;
        if (!ok_s) bad_s = true;
        if (ok_y && ok_s) step_row(yr, sr, (int)K, epsilon, dist, (int)kl_steps, op + b * K);
      }
    });
  });
  report_nonfinite(bad_y, "y");
  report_nonfinite(bad_s, "y_star");
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CPU, m) { m.impl("mad_step", TORCH_BOX(&mad_step_cpu)); }

}  // namespace ppoison
