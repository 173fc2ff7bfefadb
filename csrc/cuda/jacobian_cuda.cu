// Batched products of the proxy's per-class NLL Jacobian G [B, K, D] (CUDA twin of jacobian_cpu.cpp).
//   FC closed form (last Linear, features h [B, H], softmax p [B, K]; row k of G is (p − e_k) ⊗ h):
//     G·Gᵀ [B, K, K] = ‖h‖² (I − 1pᵀ − p1ᵀ + ‖p‖² 11ᵀ)
//     Gᵀy [B, K·H]   = vec((Σy·p − y) hᵀ)
//   Explicit G: G·Gᵀ [B, K, K] (lower-triangle tiles, mirrored) and Gᵀy [B, D].
// Threads: ‖p‖² and Σy by a warp per row b (double); FC outputs one thread per output element;
// explicit G·Gᵀ one 16×16 (k, l) tile of one sample per block step, D in 16-wide shared-memory
// chunks; explicit Gᵀy one thread per (b, d), summing over k.

#include "../ops.h"
#include "../utils.h"
#include "utils.cuh"

namespace ppoison {

namespace {

constexpr int TILE = 16;  // TILE × TILE = THREADS

// out[b] = Σ_k x[b, k] (SQUARE: Σ_k x[b, k]²), in double.
template <typename scalar_t, bool SQUARE>
__global__ void row_sum_kernel(const scalar_t* __restrict__ x, double* __restrict__ out, int64_t B, int64_t K) {
  const int lane = lane_id();
  for (int64_t b = warp_row0(); b < B; b += warp_row_stride()) {
    const scalar_t* r = x + b * K;
    double acc = 0.0;
    for (int64_t k = lane; k < K; k += WARP_SIZE) {
      const double v = (double)r[k];
      acc += SQUARE ? v * v : v;
    }
    acc = warp_sum(acc);
    if (lane == 0) out[b] = acc;
  }
}

// out[b, k, l] = ‖h_b‖² (‖p_b‖² − p_bk − p_bl + [k = l]); one thread per element.
template <typename scalar_t>
__global__ void gram_fc_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ hsq,
                               const double* __restrict__ p2, scalar_t* __restrict__ out, int64_t B, int64_t K) {
  const int64_t KK = K * K, n = B * KK;
  for (int64_t i = thread_id0(); i < n; i += thread_stride()) {
    const int64_t b = i / KK, kl = i - b * KK, k = kl / K, l = kl - k * K;
    const scalar_t* pr = p + b * K;
    const double h = (double)hsq[b];
    const double base = p2[b] - (double)pr[k];
    out[i] = (scalar_t)(k == l ? h * (base - (double)pr[k] + 1.0) : h * (base - (double)pr[l]));
  }
}

// out[b, k·H + m] = (Σy_b · p_bk − y_bk) · h_bm; one thread per element.
template <typename scalar_t>
__global__ void tvec_fc_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ h,
                               const scalar_t* __restrict__ y, const double* __restrict__ sy,
                               scalar_t* __restrict__ out, int64_t B, int64_t K, int64_t H) {
  const int64_t KH = K * H, n = B * KH;
  for (int64_t i = thread_id0(); i < n; i += thread_stride()) {
    const int64_t b = i / KH, km = i - b * KH, k = km / H, m = km - k * H;
    const scalar_t c = (scalar_t)(sy[b] * (double)p[b * K + k] - (double)y[b * K + k]);
    out[i] = c * h[b * H + m];
  }
}

// Lower-triangle tile index t (row-major over tk ≥ tl) → (tk, tl).
__device__ __forceinline__ void tri_tile(int64_t t, int64_t* tk, int64_t* tl) {
  int64_t k = (int64_t)((sqrt(8.0 * (double)t + 1.0) - 1.0) * 0.5);
  while (k * (k + 1) / 2 > t) --k;
  while ((k + 1) * (k + 2) / 2 <= t) ++k;
  *tk = k;
  *tl = t - k * (k + 1) / 2;
}

// out[b, k, l] = out[b, l, k] = Σ_d G[b, k, d] G[b, l, d]. Each block step takes one
// (sample, tile) pair with tk ≥ tl; thread (ty, tx) owns (k, l) = (tk·16 + ty, tl·16 + tx).
// Both mirrored entries come from the same sum, so the result is exactly symmetric.
template <typename scalar_t>
__global__ void gram_kernel(const scalar_t* __restrict__ G, scalar_t* __restrict__ out, int64_t B, int64_t K,
                            int64_t D, int64_t ntri) {
  using acc_t = scalar_t;
  __shared__ scalar_t sk[TILE][TILE + 1];
  __shared__ scalar_t sl[TILE][TILE + 1];
  const int tx = threadIdx.x % TILE, ty = threadIdx.x / TILE;
  for (int64_t t = blockIdx.x; t < B * ntri; t += gridDim.x) {  // block-uniform loop
    const int64_t b = t / ntri;
    int64_t tk, tl;
    tri_tile(t - b * ntri, &tk, &tl);
    const scalar_t* g = G + b * K * D;
    const int64_t k = tk * TILE + ty, l = tl * TILE + tx;
    const int64_t ll = tl * TILE + ty;  // the l-tile row this thread loads (it loads k-tile row k)
    acc_t acc = 0;
    for (int64_t d0 = 0; d0 < D; d0 += TILE) {
      const int64_t d = d0 + tx;
      sk[ty][tx] = (k < K && d < D) ? g[k * D + d] : scalar_t(0);
      sl[ty][tx] = (ll < K && d < D) ? g[ll * D + d] : scalar_t(0);
      __syncthreads();
#pragma unroll
      for (int dd = 0; dd < TILE; ++dd) acc += (acc_t)sk[ty][dd] * (acc_t)sl[tx][dd];
      __syncthreads();
    }
    if (k < K && l < K && (tk != tl || l <= k)) {
      scalar_t* o = out + b * K * K;
      o[k * K + l] = (scalar_t)acc;
      o[l * K + k] = (scalar_t)acc;
    }
  }
}

// out[b, d] = Σ_k y[b, k] G[b, k, d]; one thread per (b, d).
template <typename scalar_t>
__global__ void tvec_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ y,
                            scalar_t* __restrict__ out, int64_t B, int64_t K, int64_t D) {
  using acc_t = scalar_t;
  const int64_t n = B * D;
  for (int64_t i = thread_id0(); i < n; i += thread_stride()) {
    const int64_t b = i / D, d = i - b * D;
    const scalar_t* g = G + b * K * D + d;
    const scalar_t* yr = y + b * K;
    acc_t acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += (acc_t)yr[k] * (acc_t)g[k * D];
    out[i] = (scalar_t)acc;
  }
}

}  // namespace

Tensor jacobian_gram_fc_cuda(const Tensor& p_, const Tensor& hsq_) {
  check_gram_fc_args(p_, hsq_);
  check_cuda_inputs({{p_, "p"}, {hsq_, "h_sqnorm"}});
  const torch::stable::accelerator::DeviceGuard guard(p_.get_device_index());
  const int64_t B = p_.size(0), K = p_.size(1);
  auto p = as_contiguous(p_);
  auto hsq = as_contiguous(hsq_);
  auto out = new_tensor(p, {B, K, K});
  if (B == 0) return out;
  check_values({{p, "p", ValueCheck::Finite}, {hsq, "h_sqnorm", ValueCheck::FiniteNonneg}});
  auto p2 = new_tensor(p, {B}, ScalarType::Double);
  const cudaStream_t stream = current_stream(guard);
  PPOISON_DISPATCH_FLOATING_TYPES(p.scalar_type(), "jacobian_gram_fc_cuda", [&] {
    row_sum_kernel<scalar_t, true><<<WARP_BLOCKS(B), THREADS, 0, stream>>>(p.mutable_data_ptr<scalar_t>(),
                                                                          p2.mutable_data_ptr<double>(), B, K);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    gram_fc_kernel<scalar_t><<<BLOCKS(B * K * K), THREADS, 0, stream>>>(
        p.mutable_data_ptr<scalar_t>(), hsq.mutable_data_ptr<scalar_t>(), p2.mutable_data_ptr<double>(), out.mutable_data_ptr<scalar_t>(), B, K);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor jacobian_tvec_fc_cuda(const Tensor& p_, const Tensor& h_, const Tensor& y_) {
  check_tvec_fc_args(p_, h_, y_);
  check_cuda_inputs({{p_, "p"}, {h_, "h"}, {y_, "y"}});
  const torch::stable::accelerator::DeviceGuard guard(p_.get_device_index());
  const int64_t B = p_.size(0), K = p_.size(1), H = h_.size(1);
  auto p = as_contiguous(p_);
  auto h = as_contiguous(h_);
  auto y = as_contiguous(y_);
  auto out = new_tensor(p, {B, K * H});
  if (B == 0 || H == 0) return out;
  check_values({{p, "p", ValueCheck::Finite}, {h, "h", ValueCheck::Finite}, {y, "y", ValueCheck::Finite}});
  auto sy = new_tensor(p, {B}, ScalarType::Double);
  const cudaStream_t stream = current_stream(guard);
  PPOISON_DISPATCH_FLOATING_TYPES(p.scalar_type(), "jacobian_tvec_fc_cuda", [&] {
    row_sum_kernel<scalar_t, false><<<WARP_BLOCKS(B), THREADS, 0, stream>>>(y.mutable_data_ptr<scalar_t>(),
                                                                           sy.mutable_data_ptr<double>(), B, K);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    tvec_fc_kernel<scalar_t><<<BLOCKS(B * K * H), THREADS, 0, stream>>>(
        p.mutable_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), sy.mutable_data_ptr<double>(),
        out.mutable_data_ptr<scalar_t>(), B, K, H);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor jacobian_gram_cuda(const Tensor& G_) {
  check_jacobian_args(G_);
  check_cuda_inputs({{G_, "G"}});
  const torch::stable::accelerator::DeviceGuard guard(G_.get_device_index());
  const int64_t B = G_.size(0), K = G_.size(1), D = G_.size(2);
  auto G = as_contiguous(G_);
  auto out = new_tensor(G, {B, K, K});
  if (B == 0) return out;
  check_values({{G, "G", ValueCheck::Finite}});
  const int64_t nt = (K + TILE - 1) / TILE, ntri = nt * (nt + 1) / 2;
  const cudaStream_t stream = current_stream(guard);
  PPOISON_DISPATCH_FLOATING_TYPES(G.scalar_type(), "jacobian_gram_cuda", [&] {
    gram_kernel<scalar_t><<<BLOCKS(B * ntri, 1), TILE * TILE, 0, stream>>>(G.mutable_data_ptr<scalar_t>(),
                                                                          out.mutable_data_ptr<scalar_t>(), B, K, D, ntri);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor jacobian_tvec_cuda(const Tensor& G_, const Tensor& y_) {
  check_tvec_args(G_, y_);
  check_cuda_inputs({{G_, "G"}, {y_, "y"}});
  const torch::stable::accelerator::DeviceGuard guard(G_.get_device_index());
  const int64_t B = G_.size(0), K = G_.size(1), D = G_.size(2);
  auto G = as_contiguous(G_);
  auto y = as_contiguous(y_);
  auto out = new_tensor(G, {B, D});
  if (B == 0 || D == 0) return out;
  check_values({{G, "G", ValueCheck::Finite}, {y, "y", ValueCheck::Finite}});
  const cudaStream_t stream = current_stream(guard);
  PPOISON_DISPATCH_FLOATING_TYPES(G.scalar_type(), "jacobian_tvec_cuda", [&] {
    tvec_kernel<scalar_t><<<BLOCKS(B * D), THREADS, 0, stream>>>(G.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                                                 out.mutable_data_ptr<scalar_t>(), B, K, D);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CUDA, m) {
  m.impl("jacobian_gram_fc", TORCH_BOX(&jacobian_gram_fc_cuda));
  m.impl("jacobian_tvec_fc", TORCH_BOX(&jacobian_tvec_fc_cuda));
  m.impl("jacobian_gram", TORCH_BOX(&jacobian_gram_cuda));
  m.impl("jacobian_tvec", TORCH_BOX(&jacobian_tvec_cuda));
}

}  // namespace ppoison
