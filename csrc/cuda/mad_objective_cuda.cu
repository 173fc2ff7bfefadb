// MAD objective values of a perturbed posterior ỹ [B, K] against y [B, K] (CUDA twin of
// mad_objective_cpu.cpp), per sample, with M = G·Gᵀ and
// A = ỹᵀMỹ, C = ỹᵀMy, Y = yᵀMy, D = (ỹ − y)ᵀM(ỹ − y):
//   obj [B] = ‖Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖‖² = angular(A, C, Y),   surrogate [B] = ‖Gᵀ(ỹ − y)‖² = D
// FC/identity Gram (p [B, K], ‖h‖² [B]; objective_fc in mad_math.h) or dense Gram M [B, K, K]
// (objective_dense). A warp per row b: lanes stride over k (FC) or over the columns j of each
// row i of M (dense, coalesced), partial sums in double, shuffle-reduced; lane 0 writes.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../ops.h"
#include "../utils.h"
#include "utils.cuh"

namespace ppoison {

namespace {

template <typename scalar_t>
__global__ void objective_fc_kernel(const scalar_t* __restrict__ yt, const scalar_t* __restrict__ y,
                                    const scalar_t* __restrict__ p, const scalar_t* __restrict__ hsq,
                                    scalar_t* __restrict__ obj, scalar_t* __restrict__ sur, int64_t B, int K) {
  const int lane = lane_id();
  for (int64_t b = warp_row0(); b < B; b += warp_row_stride()) {
    const scalar_t* tr = yt + b * K;
    const scalar_t* yr = y + b * K;
    const scalar_t* pr = p ? p + b * K : nullptr;
    double st = 0.0, sy = 0.0, tt = 0.0, yy = 0.0;
    for (int k = lane; k < K; k += WARP_SIZE) {
      const double a = (double)tr[k], c = (double)yr[k];
      st += a;
      sy += c;
      tt += a * a;
      yy += c * c;
    }
    st = warp_sum(st);
    sy = warp_sum(sy);
    tt = warp_sum(tt);
    yy = warp_sum(yy);
    double A = 0.0, C = 0.0, Y = 0.0, D = 0.0;
    for (int k = lane; k < K; k += WARP_SIZE) {
      const double pk = pr ? (double)pr[k] : 0.0;
      const double wt = (double)tr[k] - pk * st, wy = (double)yr[k] - pk * sy, d = wt - wy;
      A += wt * wt;
      C += wt * wy;
      Y += wy * wy;
      D += d * d;
    }
    A = warp_sum(A);
    C = warp_sum(C);
    Y = warp_sum(Y);
    D = warp_sum(D);
    if (lane == 0) {
      const double h = hsq ? (double)hsq[b] : 1.0;
      double o = 0.0, s = 0.0;
      if (h > 0.0) {  // else G = 0: both values are 0, as in objective_fc
        o = angular(Quad{A, C, Y, kZeroRel * tt}, kZeroRel * yy);
        s = h * D;
      }
      obj[b] = (scalar_t)o;
      sur[b] = (scalar_t)s;
    }
  }
}

// Σ_ij a_i M_ij b_j is accumulated per lane as Σ_i a_i (Σ_{j ∈ lane} M_ij b_j), then reduced.
template <typename scalar_t>
__global__ void objective_dense_kernel(const scalar_t* __restrict__ yt, const scalar_t* __restrict__ y,
                                       const scalar_t* __restrict__ M, scalar_t* __restrict__ obj,
                                       scalar_t* __restrict__ sur, int64_t B, int K) {
  const int lane = lane_id();
  for (int64_t b = warp_row0(); b < B; b += warp_row_stride()) {
    const scalar_t* tr = yt + b * K;
    const scalar_t* yr = y + b * K;
    const scalar_t* Mb = M + b * (int64_t)K * K;
    double A = 0.0, C = 0.0, Y = 0.0, D = 0.0, tr_m = 0.0, tt = 0.0, yy = 0.0;
    for (int i = 0; i < K; ++i) {
      const scalar_t* Mi = Mb + (int64_t)i * K;
      double mt = 0.0, my = 0.0;
      for (int j = lane; j < K; j += WARP_SIZE) {
        const double m = (double)Mi[j];
        mt += m * (double)tr[j];
        my += m * (double)yr[j];
      }
      const double a = (double)tr[i], c = (double)yr[i];
      A += a * mt;
      C += a * my;
      Y += c * my;
      D += (a - c) * (mt - my);
    }
    for (int i = lane; i < K; i += WARP_SIZE) {
      const double a = (double)tr[i], c = (double)yr[i];
      tr_m += (double)Mb[(int64_t)i * K + i];
      tt += a * a;
      yy += c * c;
    }
    A = warp_sum(A);
    C = warp_sum(C);
    Y = warp_sum(Y);
    D = warp_sum(D);
    tr_m = warp_sum(tr_m);
    tt = warp_sum(tt);
    yy = warp_sum(yy);
    if (lane == 0) {
      const double scale = (tr_m > 0.0 ? tr_m : 0.0) / K;
      obj[b] = (scalar_t)angular(Quad{A, C, Y, kZeroRel * scale * tt}, kZeroRel * scale * yy);
      sur[b] = (scalar_t)(D > 0.0 ? D : 0.0);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mad_objective_cuda(const at::Tensor& yt_, const at::Tensor& y_,
                                                      const c10::optional<at::Tensor>& p_,
                                                      const c10::optional<at::Tensor>& hsq_,
                                                      const c10::optional<at::Tensor>& gram_) {
  check_float(y_, "y");
  check_dim(y_, 2, "y", "[B, K]");
  check_classes(y_.size(1), "y");
  check_float(yt_, "y_tilde");
  check_dim(yt_, 2, "y_tilde", "[B, K]");
  check_like(yt_, "y_tilde", y_, "y");
  check_size(yt_, 0, y_.size(0), "y_tilde", "samples");
  check_size(yt_, 1, y_.size(1), "y_tilde", "classes");
  GramArgs ga = check_gram_args(y_, p_, hsq_, gram_);
  check_cuda_inputs(
      {{y_, "y"}, {yt_, "y_tilde"}, {ga.p, "p"}, {ga.hsq, "h_sqnorm"}, {ga.gram, "gram"}});
  const c10::cuda::CUDAGuard guard(y_.device());
  const int64_t B = y_.size(0), K = y_.size(1);
  auto y = y_.contiguous();
  auto yt = yt_.contiguous();
  auto obj = at::empty({B}, y.options());
  auto sur = at::empty({B}, y.options());
  if (B == 0) return {obj, sur};
  check_values({{y, "y", ValueCheck::Finite},
                {yt, "y_tilde", ValueCheck::Finite},
                {ga.p, "p", ValueCheck::Finite},
                {ga.gram, "gram", ValueCheck::Finite},
                {ga.hsq, "h_sqnorm", ValueCheck::FiniteNonneg}});
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_objective_cuda", [&] {
    if (ga.dense) {
      objective_dense_kernel<scalar_t><<<WARP_BLOCKS(B), THREADS, 0, stream>>>(
          yt.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ga.gram.data_ptr<scalar_t>(), obj.data_ptr<scalar_t>(),
          sur.data_ptr<scalar_t>(), B, (int)K);
    } else {
      objective_fc_kernel<scalar_t><<<WARP_BLOCKS(B), THREADS, 0, stream>>>(
          yt.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ga.p.defined() ? ga.p.data_ptr<scalar_t>() : nullptr,
          ga.hsq.defined() ? ga.hsq.data_ptr<scalar_t>() : nullptr, obj.data_ptr<scalar_t>(),
          sur.data_ptr<scalar_t>(), B, (int)K);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {obj, sur};
}

TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("mad_objective", &mad_objective_cuda); }

}  // namespace ppoison
