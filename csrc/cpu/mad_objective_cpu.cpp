// MAD objective values of a perturbed posterior ỹ against y, per sample:
//   obj = ‖Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖‖²,  surrogate = ‖Gᵀ(ỹ − y)‖²
// from the FC/identity Gram (p, ‖h‖²) or a dense Gram [B, K, K], by objective_fc /
// objective_dense (mad_math.h, shared with CUDA). One task per row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "../mad_math.h"
#include "../ops.h"
#include "../utils.h"

namespace ppoison {

std::tuple<at::Tensor, at::Tensor> mad_objective_cpu(const at::Tensor& yt_, const at::Tensor& y_,
                                                     const c10::optional<at::Tensor>& p_,
                                                     const c10::optional<at::Tensor>& hsq_,
                                                     const c10::optional<at::Tensor>& gram_) {
  const ObjectiveCall c = objective_call(yt_, y_, p_, hsq_, gram_);
  const GramArgs& ga = c.gram;
  const at::Tensor &y = c.y, &yt = c.yt, &obj = c.obj, &sur = c.sur;
  const int64_t B = y.size(0), K = y.size(1);
  if (B == 0) return {obj, sur};
  std::atomic<bool> bad_y{false}, bad_t{false}, bad_p{false}, bad_h{false}, bad_m{false};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_objective_cpu", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* tp = yt.data_ptr<scalar_t>();
    const scalar_t* pp = ga.p.defined() ? ga.p.data_ptr<scalar_t>() : nullptr;
    const scalar_t* hp = ga.hsq.defined() ? ga.hsq.data_ptr<scalar_t>() : nullptr;
    const scalar_t* mp = ga.dense ? ga.gram.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = obj.data_ptr<scalar_t>();
    scalar_t* sp = sur.data_ptr<scalar_t>();
    const int64_t work = ga.dense ? K * K : K;
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / work), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* yr = yp + b * K;
        const scalar_t* tr = tp + b * K;
        if (!finite_row(yr, K)) bad_y = true;
        if (!finite_row(tr, K)) bad_t = true;
        double o = 0.0, s = 0.0;
        if (ga.dense) {
          const scalar_t* M = mp + b * K * K;
          if (!finite_row(M, K * K)) bad_m = true;
          objective_dense(tr, yr, M, (int)K, &o, &s);
        } else {
          const scalar_t* pr = pp ? pp + b * K : nullptr;
          if (pr && !finite_row(pr, K)) bad_p = true;
          const double h = hp ? (double)hp[b] : 1.0;
          if (!(std::isfinite(h) && h >= 0.0)) bad_h = true;
          objective_fc(tr, yr, pr, h, (int)K, &o, &s);
        }
        op[b] = (scalar_t)o;
        sp[b] = (scalar_t)s;
      }
    });
  });
  report_nonfinite(bad_y, "y");
  report_nonfinite(bad_t, "y_tilde");
  report_nonfinite(bad_p, "p");
  report_nonfinite(bad_m, "gram");
  TORCH_CHECK_VALUE(!bad_h, "ppoison: h_sqnorm must be finite and >= 0");
  return {obj, sur};
}

TORCH_LIBRARY_IMPL(ppoison, CPU, m) { m.impl("mad_objective", &mad_objective_cpu); }

}  // namespace ppoison
