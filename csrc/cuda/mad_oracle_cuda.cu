// MAD perturbation-direction search (CUDA twin of mad_oracle_cpu.cpp): per sample the
// target vertex y* [B, K] and its objective value [B] (see mad_math.h for the math).
//   extreme: argmax_k value(e_k)
//   argmax:  K ≤ exact_max_k: all 2^(K−1) vertices ∋ k* (oracle_argmax_exact + mask_from_rank)
//            otherwise the reference's greedy growth on the smoothed y (oracle_argmax_greedy)
//   argmin / random: e_k for k = argmin y / the given index
// One thread per sample row b, running the same mad_math.h code as the CPU kernel. Its
// per-row scratch is row b of [B, K] tensors allocated here: dense Gram M·y and M·1_S
// (double), the greedy's in_set / vertex mask (uint8), added-class order (int32) and
// smoothed y (scalar_t), plus M·y and M·1_S of the smoothed y for a dense greedy search.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../ops.h"
#include "../utils.h"
#include "utils.cuh"

namespace ppoison {

namespace {

constexpr int ORACLE_THREADS = 64;  // long-running threads: spread rows over more SMs

// Data of an optional tensor (undefined: nullptr).
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// Row b of an optional [B, K] scratch tensor.
template <typename T>
__device__ __forceinline__ T* row_of(T* base, int64_t b, int K) {
  return base ? base + b * K : nullptr;
}

// The reference smooths y in its own dtype before the greedy search.
template <typename scalar_t>
__device__ void smooth(const scalar_t* y, int K, scalar_t* out) {
  double s = 0.0;
  for (int k = 0; k < K; ++k) {
    out[k] = y[k] + (scalar_t)kGreedySmooth;
    s += (double)out[k];
  }
  for (int k = 0; k < K; ++k) out[k] = (scalar_t)((double)out[k] / s);
}

struct SearchArgs {
  Oracle oracle;
  bool objmax, greedy;
  int64_t exact_max_k, max_candidates;
};

template <typename scalar_t, typename Gram, typename Set>
__device__ void search(const Gram& g, const Gram& g_smooth, Set set, Set set_smooth, const SearchArgs& a,
                       int64_t index, const scalar_t* y, int K, unsigned char* mask, int* order, scalar_t* ystar,
                       scalar_t* value) {
  double v = 0.0;
  for (int k = 0; k < K; ++k) ystar[k] = 0;
  if (a.oracle == Oracle::Argmax) {
    const int kstar = argmax_first(y, K);
    if (K <= a.exact_max_k) {
      int64_t rank = oracle_argmax_exact(g, set, kstar, a.objmax, &v);
      mask_from_rank(rank, K, kstar, mask);
    } else {
      int t = 0, c = kstar;
      oracle_argmax_greedy(g_smooth, set_smooth, kstar, true, a.max_candidates, mask, order, &t, &c, &v);
      for (int k = 0; k < K; ++k) mask[k] = 0;
      mask[kstar] = 1;
      for (int i = 0; i < t; ++i) mask[order[i]] = 1;
      mask[c] = 1;
    }
    write_vertex(mask, K, kstar, ystar);
  } else {
    int k = 0;
    if (a.oracle == Oracle::Extreme) {
      k = oracle_extreme(g, a.objmax, &v);
    } else {
      k = a.oracle == Oracle::Argmin ? argmin_first(y, K) : (int)index;
      v = g.value(g.single(k), a.objmax);
    }
    ystar[k] = 1;
  }
  *value = (scalar_t)v;
}

// FC / identity Gram: p (nullptr: identity) and ‖h‖² (nullptr: 1).
template <typename scalar_t>
__global__ void oracle_fc_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ p,
                                 const scalar_t* __restrict__ hsq, const int64_t* __restrict__ index,
                                 SearchArgs a, int64_t B, int K, unsigned char* mask, int* order, scalar_t* ysmooth,
                                 scalar_t* __restrict__ ystar, scalar_t* __restrict__ value) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride()) {
    const scalar_t* yr = y + b * K;
    const scalar_t* ys = yr;
    if (a.greedy) {
      smooth(yr, K, ysmooth + b * K);
      ys = ysmooth + b * K;
    }
    const scalar_t* pr = p ? p + b * K : nullptr;
    const double h = hsq ? (double)hsq[b] : 1.0;
    FcGram<scalar_t> g, gs;
    g.init(yr, pr, h, K);
    gs = g;
    if (a.greedy) gs.init(ys, pr, h, K);
    search(g, gs, g.empty_set(), gs.empty_set(), a, index ? index[b] : 0, yr, K, row_of(mask, b, K),
           row_of(order, b, K), ystar + b * K, value + b);
  }
}

// Dense Gram M [B, K, K].
template <typename scalar_t>
__global__ void oracle_dense_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ M,
                                    const int64_t* __restrict__ index, SearchArgs a, int64_t B, int K, double* my,
                                    double* r, double* my_smooth, double* r_smooth, unsigned char* mask, int* order,
                                    scalar_t* ysmooth, scalar_t* __restrict__ ystar, scalar_t* __restrict__ value) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride()) {
    const scalar_t* yr = y + b * K;
    const scalar_t* ys = yr;
    if (a.greedy) {
      smooth(yr, K, ysmooth + b * K);
      ys = ysmooth + b * K;
    }
    const scalar_t* Mb = M + b * (int64_t)K * K;
    DenseGram<scalar_t> g, gs;
    g.init(yr, Mb, K, my + b * K);
    gs = g;
    if (a.greedy) gs.init(ys, Mb, K, my_smooth + b * K);
    // The smoothed set is only used by the greedy search.
    const DenseSet set_smooth = a.greedy ? gs.empty_set(r_smooth + b * K) : DenseSet{0, 0.0, 0.0, nullptr};
    search(g, gs, g.empty_set(r + b * K), set_smooth, a, index ? index[b] : 0, yr, K, row_of(mask, b, K),
           row_of(order, b, K), ystar + b * K, value + b);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mad_oracle_cuda(const at::Tensor& y_, const c10::optional<at::Tensor>& p_,
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
  }
  check_cuda_inputs(
      {{y, "y"}, {ga.p, "p"}, {ga.hsq, "h_sqnorm"}, {ga.gram, "gram"}, {index, "index"}});
  const c10::cuda::CUDAGuard guard(y.device());
  if (index.defined() && B > 0) {
    TORCH_CHECK_VALUE(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < K,
                      "ppoison: index values must be in [0, K) = [0, ", K, ")");
  }
  auto ystar = at::empty({B, K}, y.options());
  auto value = at::empty({B}, y.options());
  if (B == 0) return {ystar, value};
  // The CPU kernel skips and reports rows in this order: y, then p, gram, h_sqnorm.
  check_values({{y, "y", ValueCheck::Finite},
                {ga.p, "p", ValueCheck::Finite},
                {ga.gram, "gram", ValueCheck::Finite},
                {ga.hsq, "h_sqnorm", ValueCheck::FiniteNonneg}});

  const SearchArgs args{oracle, objmax, oracle == Oracle::Argmax && K > exact_max_k, exact_max_k, max_candidates};
  const bool argmax = oracle == Oracle::Argmax;
  auto opt_f64 = y.options().dtype(at::kDouble);
  at::Tensor mask = argmax ? at::empty({B, K}, y.options().dtype(at::kByte)) : at::Tensor();
  at::Tensor order = args.greedy ? at::empty({B, K}, y.options().dtype(at::kInt)) : at::Tensor();
  at::Tensor ysmooth = args.greedy ? at::empty({B, K}, y.options()) : at::Tensor();
  at::Tensor my, r, my_smooth, r_smooth;
  if (ga.dense) {
    my = at::empty({B, K}, opt_f64);
    r = at::empty({B, K}, opt_f64);
    if (args.greedy) {
      my_smooth = at::empty({B, K}, opt_f64);
      r_smooth = at::empty({B, K}, opt_f64);
    }
  }
  unsigned char* mask_p = data_or_null<unsigned char>(mask);
  int* order_p = data_or_null<int>(order);
  const int64_t* index_p = data_or_null<int64_t>(index);

  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = BLOCKS(B, ORACLE_THREADS);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_oracle_cuda", [&] {
    scalar_t* ysmooth_p = data_or_null<scalar_t>(ysmooth);
    if (ga.dense) {
      oracle_dense_kernel<scalar_t><<<blocks, ORACLE_THREADS, 0, stream>>>(
          y.data_ptr<scalar_t>(), ga.gram.data_ptr<scalar_t>(), index_p, args, B, (int)K, my.data_ptr<double>(),
          r.data_ptr<double>(), data_or_null<double>(my_smooth), data_or_null<double>(r_smooth),
          mask_p, order_p, ysmooth_p, ystar.data_ptr<scalar_t>(), value.data_ptr<scalar_t>());
    } else {
      oracle_fc_kernel<scalar_t><<<blocks, ORACLE_THREADS, 0, stream>>>(
          y.data_ptr<scalar_t>(), data_or_null<scalar_t>(ga.p), data_or_null<scalar_t>(ga.hsq), index_p, args, B,
          (int)K, mask_p, order_p, ysmooth_p, ystar.data_ptr<scalar_t>(), value.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ystar, value};
}

TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("mad_oracle", &mad_oracle_cuda); }

}  // namespace ppoison
