// MAD perturbation-direction search: per sample the target vertex y* and its
// objective value, by oracle_row_fc / oracle_row_dense (oracle.h, shared with CUDA).
//   extreme: argmax_k value(e_k)                        O(K)   (FC), O(K²) (dense)
//   argmax:  K ≤ exact_max_k: all 2^(K−1) vertices ∋ k*  O(1)/vertex (FC), O(K)/vertex (dense)
//            otherwise the reference's greedy growth    O(1)/candidate after O(K) per step
//   argmin / random: e_k for k = argmin y / the given index
// One task per sample row b; per-thread K-entry scratch.

#include <atomic>
#include <vector>

#include "../oracle.h"
#include "../ops.h"
#include "../utils.h"

namespace ppoison {

std::tuple<Tensor, Tensor> mad_oracle_cpu(const Tensor& y_, const OptTensor& p_,
                                                  const OptTensor& hsq_,
                                                  const OptTensor& gram_, std::string_view oracle_s,
                                                  bool objmax, int64_t exact_max_k, int64_t max_candidates,
                                                  const OptTensor& index_) {
  const OracleInputs in = check_oracle_args(y_, p_, hsq_, gram_, oracle_s, exact_max_k, max_candidates, index_);
  const GramArgs& ga = in.gram;
  const Tensor& y = in.y;
  const int64_t B = y.size(0), K = y.size(1);
  auto ystar = new_tensor(y, {B, K});
  auto value = new_tensor(y, {B});
  if (B == 0) return {ystar, value};

  const bool argmax = in.oracle == Oracle::Argmax;
  const OracleArgs args{in.oracle, objmax, argmax && K > exact_max_k, max_candidates};
  std::atomic<bool> bad_y{false}, bad_p{false}, bad_h{false}, bad_m{false};
  int64_t cost = K;
  if (argmax) cost = args.greedy ? 4 * std::min<int64_t>(max_candidates, K * K) : (int64_t)4 << (K - 1);
  if (ga.dense) cost *= K;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cost, 1));

  PPOISON_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_oracle_cpu", [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* pp = ga.p.defined() ? ga.p.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* hp = ga.hsq.defined() ? ga.hsq.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mp = ga.dense ? ga.gram.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ip = in.index.defined() ? in.index.const_data_ptr<int64_t>() : nullptr;
    scalar_t* sp = ystar.mutable_data_ptr<scalar_t>();
    scalar_t* vp = value.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      std::vector<unsigned char> mask(K);
      std::vector<int> order(K);
      std::vector<scalar_t> ysmooth(K);
      std::vector<double> my(K), r(K);
      const OracleScratch<scalar_t> s{mask.data(), order.data(), ysmooth.data(), my.data(), r.data()};
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* yr = yp + b * K;
        if (!finite_row(yr, K)) {
          bad_y = true;
          continue;
        }
        const int64_t idx = ip ? ip[b] : 0;
        if (ga.dense) {
          const scalar_t* M = mp + b * K * K;
          if (!finite_row(M, K * K)) {
            bad_m = true;
            continue;
          }
          oracle_row_dense(yr, M, idx, (int)K, args, s, sp + b * K, vp + b);
        } else {
          const scalar_t* pr = pp ? pp + b * K : nullptr;
          if (pr && !finite_row(pr, K)) {
            bad_p = true;
            continue;
          }
          const double h = hp ? (double)hp[b] : 1.0;
          if (!(std::isfinite(h) && h >= 0.0)) {
            bad_h = true;
            continue;
          }
          oracle_row_fc(yr, pr, h, idx, (int)K, args, s, sp + b * K, vp + b);
        }
      }
    });
  });
  report_nonfinite(bad_y, "y");
  report_nonfinite(bad_p, "p");
  report_nonfinite(bad_m, "gram");
  PPOISON_CHECK(!bad_h, "ppoison: h_sqnorm must be finite and >= 0");
  return {ystar, value};
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CPU, m) { m.impl("mad_oracle", TORCH_BOX(&mad_oracle_cpu)); }

}  // namespace ppoison
