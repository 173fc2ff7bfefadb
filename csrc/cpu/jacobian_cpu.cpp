// Batched products of the proxy's per-class NLL Jacobian G [B, K, D].
//   FC closed form (last Linear, features h, softmax p; row k of G is (p − e_k) ⊗ h):
//     G·Gᵀ = ‖h‖² (I − 1pᵀ − p1ᵀ + ‖p‖² 11ᵀ)        Gᵀy = vec((Σy·p − y) hᵀ)
//   Explicit G: G·Gᵀ (lower triangle, mirrored) and Gᵀy by direct summation; G is checked for
//   NaN/Inf only when the result shows one (every non-finite entry of G reaches it).
// One task per sample row b (torch::stable::parallel_for over B).

#include <atomic>
#include <vector>

#include "../ops.h"
#include "../utils.h"

namespace ppoison {

namespace {

int64_t grain_for(int64_t work_per_row) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row)); }

}  // namespace

Tensor jacobian_gram_fc_cpu(const Tensor& p_, const Tensor& hsq_) {
  check_gram_fc_args(p_, hsq_);
  const int64_t B = p_.size(0), K = p_.size(1);
  auto p = as_contiguous(p_);
  auto hsq = as_contiguous(hsq_);
  auto out = new_tensor(p, {B, K, K});
  if (B == 0) return out;
  std::atomic<bool> bad_p{false}, bad_h{false};
  PPOISON_DISPATCH_FLOATING_TYPES(p.scalar_type(), "jacobian_gram_fc_cpu", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* hp = hsq.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B, grain_for(K * K), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* pr = pp + b * K;
        const double h = (double)hp[b];
        if (!finite_row(pr, K)) bad_p = true;
        if (!(std::isfinite(h) && h >= 0.0)) bad_h = true;
        double p2 = 0.0;
        for (int64_t k = 0; k < K; ++k) p2 += (double)pr[k] * (double)pr[k];
        scalar_t* o = op + b * K * K;
        for (int64_t k = 0; k < K; ++k) {
          const double base = p2 - (double)pr[k];
          for (int64_t l = 0; l < K; ++l) o[k * K + l] = (scalar_t)(h * (base - (double)pr[l]));
          o[k * K + k] = (scalar_t)(h * (base - (double)pr[k] + 1.0));
        }
      }
    });
  });
  report_nonfinite(bad_p, "p");
  PPOISON_CHECK(!bad_h, "ppoison: h_sqnorm must be finite and >= 0");
  return out;
}

Tensor jacobian_tvec_fc_cpu(const Tensor& p_, const Tensor& h_, const Tensor& y_) {
  check_tvec_fc_args(p_, h_, y_);
  const int64_t B = p_.size(0), K = p_.size(1), H = h_.size(1);
  auto p = as_contiguous(p_);
  auto h = as_contiguous(h_);
  auto y = as_contiguous(y_);
  auto out = new_tensor(p, {B, K * H});
  if (B == 0 || H == 0) return out;
  std::atomic<bool> bad_p{false}, bad_h{false}, bad_y{false};
  PPOISON_DISPATCH_FLOATING_TYPES(p.scalar_type(), "jacobian_tvec_fc_cpu", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B, grain_for(K * H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* pr = pp + b * K;
        const scalar_t* yr = yp + b * K;
        const scalar_t* hr = hp + b * H;
        if (!finite_row(pr, K)) bad_p = true;
        if (!finite_row(yr, K)) bad_y = true;
        if (!finite_row(hr, H)) bad_h = true;
        double sy = 0.0;
        for (int64_t k = 0; k < K; ++k) sy += (double)yr[k];
        scalar_t* o = op + b * K * H;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t c = (scalar_t)(sy * (double)pr[k] - (double)yr[k]);
          scalar_t* ok = o + k * H;
          for (int64_t m = 0; m < H; ++m) ok[m] = c * hr[m];
        }
      }
    });
  });
  report_nonfinite(bad_p, "p");
  report_nonfinite(bad_h, "h");
  report_nonfinite(bad_y, "y");
  return out;
}

Tensor jacobian_gram_cpu(const Tensor& G_) {
  check_jacobian_args(G_);
  const int64_t B = G_.size(0), K = G_.size(1), D = G_.size(2);
  auto G = as_contiguous(G_);
  auto out = new_tensor(G, {B, K, K});
  if (B == 0) return out;
  std::atomic<bool> bad{false};
  PPOISON_DISPATCH_FLOATING_TYPES(G.scalar_type(), "jacobian_gram_cpu", [&] {
    const scalar_t* gp = G.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B, grain_for(K * K * std::max<int64_t>(D, 1) / 2), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* g = gp + b * K * D;
        scalar_t* o = op + b * K * K;
        bool diag_finite = true;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* gk = g + k * D;
          for (int64_t l = 0; l <= k; ++l) {
            const scalar_t* gl = g + l * D;
            scalar_t acc = 0;
            for (int64_t d = 0; d < D; ++d) acc += gk[d] * gl[d];
            o[k * K + l] = acc;
            o[l * K + k] = acc;
          }
          diag_finite &= std::isfinite((double)o[k * K + k]);
        }
        // A NaN/Inf in row k of G makes (GGᵀ)_kk = Σ g_kd² non-finite; only then scan G itself
        // (a finite G whose squares overflow is not an input error).
        if (!diag_finite && !finite_row(g, K * D)) bad = true;
      }
    });
  });
  report_nonfinite(bad, "G");
  return out;
}

Tensor jacobian_tvec_cpu(const Tensor& G_, const Tensor& y_) {
  check_tvec_args(G_, y_);
  const int64_t B = G_.size(0), K = G_.size(1), D = G_.size(2);
  auto G = as_contiguous(G_);
  auto y = as_contiguous(y_);
  auto out = new_tensor(G, {B, D});
  if (B == 0 || D == 0) return out;
  std::atomic<bool> bad_g{false}, bad_y{false};
  PPOISON_DISPATCH_FLOATING_TYPES(G.scalar_type(), "jacobian_tvec_cpu", [&] {
    const scalar_t* gp = G.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B, grain_for(K * D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* g = gp + b * K * D;
        const scalar_t* yr = yp + b * K;
        if (!finite_row(yr, K)) bad_y = true;
        scalar_t* o = op + b * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t yk = yr[k];
          const scalar_t* gk = g + k * D;
          for (int64_t d = 0; d < D; ++d) o[d] += yk * gk[d];
        }
        // a NaN/Inf anywhere in G reaches the output (y_k·Inf is Inf or, for y_k = 0, NaN):
        // one pass over G instead of two
        if (!finite_row(o, D) && !finite_row(g, K * D)) bad_g = true;
      }
    });
  });
  report_nonfinite(bad_g, "G");
  report_nonfinite(bad_y, "y");
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CPU, m) {
  m.impl("jacobian_gram_fc", TORCH_BOX(&jacobian_gram_fc_cpu));
  m.impl("jacobian_tvec_fc", TORCH_BOX(&jacobian_tvec_fc_cpu));
  m.impl("jacobian_gram", TORCH_BOX(&jacobian_gram_cpu));
  m.impl("jacobian_tvec", TORCH_BOX(&jacobian_tvec_cpu));
}

}  // namespace ppoison
