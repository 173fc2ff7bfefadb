// MAD objective values of a perturbed posterior ỹ against y, per sample:
//   obj = ‖Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖‖²,  surrogate = ‖Gᵀ(ỹ − y)‖²
// from the FC/identity Gram (p, ‖h‖²) or a dense Gram [B, K, K], by objective_fc /
// objective_dense (mad_math.h, shared with CUDA). One task per row.

#include <atomic>

#include "../mad_math.h"
#include "../ops.h"
#include "../utils.h"

namespace ppoison {

std::tuple<Tensor, Tensor> mad_objective_cpu(const Tensor& yt_, const Tensor& y_,
                                                     const OptTensor& p_,
                                                     const OptTensor& hsq_,
                                                     const OptTensor& gram_) {
  const ObjectiveCall c = objective_call(yt_, y_, p_, hsq_, gram_);
  const GramArgs& ga = c.gram;
  const Tensor &y = c.y, &yt = c.yt, &obj = c.obj, &sur = c.sur;
  const int64_t B = y.size(0), K = y.size(1);
  if (B == 0) return {obj, sur};
  std::atomic<bool> bad_y{false}, bad_t{false}, bad_p{false}, bad_h{false}, bad_m{false};
  PPOISON_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_objective_cpu", [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* tp = yt.const_data_ptr<scalar_t>();
    const scalar_t* pp = ga.p.defined() ? ga.p.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* hp = ga.hsq.defined() ? ga.hsq.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mp = ga.dense ? ga.gram.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = obj.mutable_data_ptr<scalar_t>();
    scalar_t* sp = sur.mutable_data_ptr<scalar_t>();
    const int64_t work = ga.dense ? K * K : K;
    torch::stable::parallel_for(0, B, std::max<int64_t>(1, 16384 / work), [&](int64_t b0, int64_t b1) {
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
  PPOISON_CHECK(!bad_h, "ppoison: h_sqnorm must be finite and >= 0");
  return {obj, sur};
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CPU, m) { m.impl("mad_objective", TORCH_BOX(&mad_objective_cpu)); }

}  // namespace ppoison
