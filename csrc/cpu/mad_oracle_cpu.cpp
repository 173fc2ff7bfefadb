// MAD perturbation-direction search: per sample the target vertex y* and its
// objective value (see mad_math.h for the math and the vertex sets).
//   extreme: argmax_k value(e_k)                        O(K)   (FC), O(K²) (dense)
//   argmax:  K ≤ exact_max_k: all 2^(K−1) vertices ∋ k*  O(1)/vertex (FC), O(K)/vertex (dense)
//            otherwise the reference's greedy growth    O(1)/candidate after O(K) per step
//   argmin / random: e_k for k = argmin y / the given index
// One task per sample row b.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "../ops.h"
#include "../utils.h"

namespace ppoison {

namespace {

constexpr int kMaxBufferedK = 17;  // 2^16 doubles (512 KiB) per thread at most; above: two passes

template <typename scalar_t>
struct Scratch {
  std::vector<double> my, r;
  std::vector<unsigned char> mask;
  std::vector<int> order;
  std::vector<scalar_t> ysmooth;
  std::vector<double> values;  // the exact argmax search's 2^(K−1) objective values
  Scratch(int K, int64_t exact_max_k)
      : my(K), r(K), mask(K), order(K), ysmooth(K),
        values(K <= exact_max_k && K <= kMaxBufferedK ? (size_t)1 << (K - 1) : 0) {}
};

// The reference smooths y in its own dtype before the greedy search.
template <typename scalar_t>
void smooth(const scalar_t* y, int K, scalar_t* out) {
  double s = 0.0;
  for (int k = 0; k < K; ++k) {
    out[k] = y[k] + (scalar_t)kGreedySmooth;
    s += (double)out[k];
  }
  for (int k = 0; k < K; ++k) out[k] = (scalar_t)((double)out[k] / s);
}

template <typename scalar_t, typename Gram, typename Set>
void search(const Gram& g, const Gram& g_smooth, Set set, Set set_smooth, Oracle oracle, bool objmax,
            int64_t exact_max_k, int64_t max_candidates, int64_t index, const scalar_t* y, int K,
            Scratch<scalar_t>& s, scalar_t* ystar, scalar_t* value) {
  double v = 0.0;
  for (int k = 0; k < K; ++k) ystar[k] = 0;
  if (oracle == Oracle::Argmax) {
    const int kstar = argmax_first(y, K);
    if (K <= exact_max_k) {
      int64_t rank = oracle_argmax_exact(g, set, kstar, objmax, &v, s.values.empty() ? nullptr : s.values.data());
      mask_from_rank(rank, K, kstar, s.mask.data());
    } else {
      int t = 0, c = kstar;
      oracle_argmax_greedy(g_smooth, set_smooth, kstar, true, max_candidates, s.mask.data(), s.order.data(), &t,
                           &c, &v);
      for (int k = 0; k < K; ++k) s.mask[k] = 0;
      s.mask[kstar] = 1;
      for (int i = 0; i < t; ++i) s.mask[s.order[i]] = 1;
      s.mask[c] = 1;
    }
    write_vertex(s.mask.data(), K, kstar, ystar);
  } else {
    int k = 0;
    if (oracle == Oracle::Extreme) {
      k = oracle_extreme(g, objmax, &v);
    } else {
      k = oracle == Oracle::Argmin ? argmin_first(y, K) : (int)index;
      v = g.value(g.single(k), objmax);
    }
    ystar[k] = 1;
  }
  *value = (scalar_t)v;
}

template <typename scalar_t>
bool finite_row(const scalar_t* v, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite((double)v[i]);
  return ok;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mad_oracle_cpu(const at::Tensor& y_, const c10::optional<at::Tensor>& p_,
                                                  const c10::optional<at::Tensor>& hsq_,
                                                  const c10::optional<at::Tensor>& gram_, c10::string_view oracle_s,
                                                  bool objmax, int64_t exact_max_k, int64_t max_candidates,
                                                  const c10::optional<at::Tensor>& index_) {
  check_float(y_, "y");
  check_dim(y_, 2, "y", "[B, K]");
  check_classes(y_.size(1), "y");
  const Oracle oracle = parse_oracle(oracle_s);
  TORCH_CHECK_VALUE(exact_max_k >= 0 && exact_max_k <= 24, "ppoison: exact_max_k must be in [0, 24], got ",
                    exact_max_k);
  TORCH_CHECK_VALUE(max_candidates >= 1, "ppoison: max_candidates must be >= 1, got ", max_candidates);
  GramArgs ga = check_gram_args(y_, p_, hsq_, gram_);
  const int64_t B = y_.size(0), K = y_.size(1);
  auto y = y_.contiguous();
  at::Tensor index;
  if (oracle == Oracle::Random) {
    TORCH_CHECK_VALUE(index_.has_value(), "ppoison: oracle 'random' needs index, a [B] int64 tensor of classes");
    TORCH_CHECK_TYPE(index_->scalar_type() == at::kLong, "ppoison: index must be an int64 tensor, got ",
                     index_->scalar_type());
    check_dim(*index_, 1, "index", "[B]");
    TORCH_CHECK_VALUE(index_->device() == y.device(), "ppoison: index is on ", index_->device(), " but y is on ",
                      y.device());
    check_size(*index_, 0, B, "index", "samples");
    index = index_->contiguous();
    if (B > 0) {
      TORCH_CHECK_VALUE(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < K,
                        "ppoison: index values must be in [0, K) = [0, ", K, ")");
    }
  }
  auto ystar = at::empty({B, K}, y.options());
  auto value = at::empty({B}, y.options());
  if (B == 0) return {ystar, value};

  std::atomic<bool> bad_y{false}, bad_p{false}, bad_h{false}, bad_m{false};
  const bool greedy = oracle == Oracle::Argmax && K > exact_max_k;
  int64_t cost = K;
  if (oracle == Oracle::Argmax) cost = greedy ? 4 * std::min<int64_t>(max_candidates, K * K) : (int64_t)4 << (K - 1);
  if (ga.dense) cost *= K;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cost, 1));

  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_oracle_cpu", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* pp = ga.p.defined() ? ga.p.data_ptr<scalar_t>() : nullptr;
    const scalar_t* hp = ga.hsq.defined() ? ga.hsq.data_ptr<scalar_t>() : nullptr;
    const scalar_t* mp = ga.dense ? ga.gram.data_ptr<scalar_t>() : nullptr;
    const int64_t* ip = index.defined() ? index.data_ptr<int64_t>() : nullptr;
    scalar_t* sp = ystar.data_ptr<scalar_t>();
    scalar_t* vp = value.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      Scratch<scalar_t> s((int)K, oracle == Oracle::Argmax ? exact_max_k : 0);
      std::vector<double> my_smooth(K), r_smooth(K);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* yr = yp + b * K;
        if (!finite_row(yr, K)) {
          bad_y = true;
          continue;
        }
        const int64_t idx = ip ? ip[b] : 0;
        const scalar_t* ys = yr;
        if (greedy) {
          smooth(yr, (int)K, s.ysmooth.data());
          ys = s.ysmooth.data();
        }
        if (ga.dense) {
          const scalar_t* M = mp + b * K * K;
          if (!finite_row(M, K * K)) {
            bad_m = true;
            continue;
          }
          DenseGram<scalar_t> g, gs;
          g.init(yr, M, (int)K, s.my.data());
          gs = g;
          if (greedy) gs.init(ys, M, (int)K, my_smooth.data());
          search(g, gs, g.empty_set(s.r.data()), gs.empty_set(r_smooth.data()), oracle, objmax, exact_max_k,
                 max_candidates, idx, yr, (int)K, s, sp + b * K, vp + b);
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
          FcGram<scalar_t> g, gs;
          g.init(yr, pr, h, (int)K);
          gs = g;
          if (greedy) gs.init(ys, pr, h, (int)K);
          search(g, gs, g.empty_set(), gs.empty_set(), oracle, objmax, exact_max_k, max_candidates, idx, yr,
                 (int)K, s, sp + b * K, vp + b);
        }
      }
    });
  });
  report_nonfinite(bad_y, "y");
  report_nonfinite(bad_p, "p");
  report_nonfinite(bad_m, "gram");
  TORCH_CHECK_VALUE(!bad_h, "ppoison: h_sqnorm must be finite and >= 0");
  return {ystar, value};
}

TORCH_LIBRARY_IMPL(ppoison, CPU, m) { m.impl("mad_oracle", &mad_oracle_cpu); }

}  // namespace ppoison
