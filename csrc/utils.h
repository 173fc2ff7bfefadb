// Argument checks shared by the CPU and CUDA entry points, so both raise the
// same errors: TypeError for dtypes, ValueError for shapes, devices and values.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "options.h"

namespace ppoison {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "ppoison: ", name,
                   " must be a float32 or float64 tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, "ppoison: ", name, " must have shape ", shape, ", got a tensor of shape ",
                    t.sizes());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "ppoison: ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; all tensors must be on the same device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "ppoison: ", name, " has dtype ", t.scalar_type(),
                   " but ", ref_name, " has dtype ", ref.scalar_type(), "; dtypes must match");
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "ppoison: ", name, " has ", t.size(dim), " ", what, " (dim ", dim,
                    ") but ", expected, " were expected from the other arguments; got shape ", t.sizes());
}

inline void check_classes(int64_t K, const char* name) {
  TORCH_CHECK_VALUE(K >= 2, "ppoison: ", name, " must have at least 2 classes (K >= 2), got K = ", K);
}

inline void check_finite_scalar(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), "ppoison: ", name, " must be finite, got ", v);
}

// Raises when a kernel saw a NaN/Inf while reading `name`.
inline void report_nonfinite(bool bad, const char* name) {
  TORCH_CHECK_VALUE(!bad, "ppoison: ", name, " contains NaN or Inf values");
}

// Whether all n values are finite (the CPU kernels' in-loop check).
template <typename scalar_t>
bool finite_row(const scalar_t* v, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite((double)v[i]);
  return ok;
}

// One pass over the tensor (used where the kernel does not read every value, and on CUDA).
inline void check_finite(const at::Tensor& t, const char* name) {
  if (t.numel() == 0) return;
  report_nonfinite(!at::isfinite(t).all().item<bool>(), name);
}

// Gram arguments of mad_oracle / mad_objective: either an explicit `gram` [B, K, K]
// or the FC form (`p` [B, K], `h_sqnorm` [B]); neither means the identity.
struct GramArgs {
  bool dense;
  at::Tensor p, hsq, gram;
};

inline GramArgs check_gram_args(const at::Tensor& y, const c10::optional<at::Tensor>& p,
                                const c10::optional<at::Tensor>& h_sqnorm, const c10::optional<at::Tensor>& gram) {
  const int64_t B = y.size(0), K = y.size(1);
  GramArgs g;
  g.dense = gram.has_value();
  if (g.dense) {
    TORCH_CHECK_VALUE(!p.has_value() && !h_sqnorm.has_value(),
                      "ppoison: pass either gram or (p, h_sqnorm), not both");
    check_float(*gram, "gram");
    check_dim(*gram, 3, "gram", "[B, K, K]");
    check_like(*gram, "gram", y, "y");
    check_size(*gram, 0, B, "gram", "samples");
    check_size(*gram, 1, K, "gram", "classes");
    check_size(*gram, 2, K, "gram", "classes");
    g.gram = gram->contiguous();
    return g;
  }
  if (p.has_value()) {
    check_float(*p, "p");
    check_dim(*p, 2, "p", "[B, K]");
    check_like(*p, "p", y, "y");
    check_size(*p, 0, B, "p", "samples");
    check_size(*p, 1, K, "p", "classes");
    g.p = p->contiguous();
  }
  if (h_sqnorm.has_value()) {
    check_float(*h_sqnorm, "h_sqnorm");
    check_dim(*h_sqnorm, 1, "h_sqnorm", "[B]");
    check_like(*h_sqnorm, "h_sqnorm", y, "y");
    check_size(*h_sqnorm, 0, B, "h_sqnorm", "samples");
    g.hsq = h_sqnorm->contiguous();
  }
  return g;
}

inline void check_step_args(const at::Tensor& y, const at::Tensor& ys, double epsilon, int64_t kl_steps) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_classes(y.size(1), "y");
  check_float(ys, "y_star");
  check_dim(ys, 2, "y_star", "[B, K]");
  check_like(ys, "y_star", y, "y");
  check_size(ys, 0, y.size(0), "y_star", "samples");
  check_size(ys, 1, y.size(1), "y_star", "classes");
  TORCH_CHECK_VALUE(std::isfinite(epsilon) && epsilon >= 0.0, "ppoison: epsilon must be finite and >= 0, got ",
                    epsilon);
  TORCH_CHECK_VALUE(kl_steps >= 0 && kl_steps <= 64, "ppoison: kl_steps must be in [0, 64], got ", kl_steps);
}

// Arguments of mad_oracle, contiguous, with the parsed option.
struct OracleInputs {
  Oracle oracle;
  GramArgs gram;
  at::Tensor y, index;  // index: defined for oracle 'random'
};

inline OracleInputs check_oracle_args(const at::Tensor& y, const c10::optional<at::Tensor>& p,
                                      const c10::optional<at::Tensor>& h_sqnorm,
                                      const c10::optional<at::Tensor>& gram, c10::string_view oracle,
                                      int64_t exact_max_k, int64_t max_candidates,
                                      const c10::optional<at::Tensor>& index) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_classes(y.size(1), "y");
  OracleInputs in;
  in.oracle = parse_oracle(oracle);
  TORCH_CHECK_VALUE(exact_max_k >= 0 && exact_max_k <= 24, "ppoison: exact_max_k must be in [0, 24], got ",
                    exact_max_k);
  TORCH_CHECK_VALUE(max_candidates >= 1, "ppoison: max_candidates must be >= 1, got ", max_candidates);
  in.gram = check_gram_args(y, p, h_sqnorm, gram);
  const int64_t B = y.size(0), K = y.size(1);
  in.y = y.contiguous();
  if (in.oracle == Oracle::Random) {
    TORCH_CHECK_VALUE(index.has_value(), "ppoison: oracle 'random' needs index, a [B] int64 tensor of classes");
    TORCH_CHECK_TYPE(index->scalar_type() == at::kLong, "ppoison: index must be an int64 tensor, got ",
                     index->scalar_type());
    check_dim(*index, 1, "index", "[B]");
    TORCH_CHECK_VALUE(index->device() == y.device(), "ppoison: index is on ", index->device(), " but y is on ",
                      y.device());
    check_size(*index, 0, B, "index", "samples");
    in.index = index->contiguous();
    if (B > 0) {
      TORCH_CHECK_VALUE(in.index.min().item<int64_t>() >= 0 && in.index.max().item<int64_t>() < K,
                        "ppoison: index values must be in [0, K) = [0, ", K, ")");
    }
  }
  return in;
}

// Checked, contiguous arguments of mad_objective and its outputs obj, sur [B].
struct ObjectiveCall {
  GramArgs gram;
  at::Tensor yt, y, obj, sur;
};

inline ObjectiveCall objective_call(const at::Tensor& yt, const at::Tensor& y, const c10::optional<at::Tensor>& p,
                                    const c10::optional<at::Tensor>& h_sqnorm,
                                    const c10::optional<at::Tensor>& gram) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_classes(y.size(1), "y");
  check_float(yt, "y_tilde");
  check_dim(yt, 2, "y_tilde", "[B, K]");
  check_like(yt, "y_tilde", y, "y");
  check_size(yt, 0, y.size(0), "y_tilde", "samples");
  check_size(yt, 1, y.size(1), "y_tilde", "classes");
  ObjectiveCall c;
  c.gram = check_gram_args(y, p, h_sqnorm, gram);
  c.yt = yt.contiguous();
  c.y = y.contiguous();
  c.obj = at::empty({y.size(0)}, y.options());
  c.sur = at::empty({y.size(0)}, y.options());
  return c;
}

inline void check_project_args(const at::Tensor& v, double radius) {
  check_float(v, "v");
  check_dim(v, 2, "v", "[B, K]");
  TORCH_CHECK_VALUE(v.size(1) >= 1, "ppoison: v must have at least one column, got shape ", v.sizes());
  TORCH_CHECK_VALUE(std::isfinite(radius) && radius > 0.0, "ppoison: radius must be finite and > 0, got ", radius);
}

inline void check_gram_fc_args(const at::Tensor& p, const at::Tensor& h_sqnorm) {
  check_float(p, "p");
  check_dim(p, 2, "p", "[B, K]");
  check_classes(p.size(1), "p");
  check_float(h_sqnorm, "h_sqnorm");
  check_dim(h_sqnorm, 1, "h_sqnorm", "[B]");
  check_like(h_sqnorm, "h_sqnorm", p, "p");
  check_size(h_sqnorm, 0, p.size(0), "h_sqnorm", "samples");
}

inline void check_tvec_fc_args(const at::Tensor& p, const at::Tensor& h, const at::Tensor& y) {
  check_float(p, "p");
  check_dim(p, 2, "p", "[B, K]");
  check_classes(p.size(1), "p");
  check_float(h, "h");
  check_dim(h, 2, "h", "[B, H]");
  check_like(h, "h", p, "p");
  check_size(h, 0, p.size(0), "h", "samples");
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_like(y, "y", p, "p");
  check_size(y, 0, p.size(0), "y", "samples");
  check_size(y, 1, p.size(1), "y", "classes");
}

inline void check_jacobian_args(const at::Tensor& G) {
  check_float(G, "G");
  check_dim(G, 3, "G", "[B, K, D]");
  check_classes(G.size(1), "G");
}

inline void check_tvec_args(const at::Tensor& G, const at::Tensor& y) {
  check_jacobian_args(G);
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_like(y, "y", G, "G");
  check_size(y, 0, G.size(0), "y", "samples");
  check_size(y, 1, G.size(1), "y", "classes");
}

}  // namespace ppoison
