// Argument checks shared by the CPU and CUDA entry points, so both raise the
// same errors (ValueError in Python, see stable.h).
#pragma once

#include <cmath>
#include <initializer_list>
#include <vector>

#include "options.h"
#include "stable.h"

namespace ppoison {

inline void check_float(const Tensor& t, const char* name) {
  PPOISON_CHECK(t.scalar_type() == ScalarType::Float || t.scalar_type() == ScalarType::Double, "ppoison: ", name,
                " must be a float32 or float64 tensor, got ", dtype_str(t.scalar_type()));
}

inline void check_dim(const Tensor& t, int64_t dim, const char* name, const char* shape) {
  PPOISON_CHECK(t.dim() == dim, "ppoison: ", name, " must have shape ", shape, ", got a tensor of shape ",
                shape_str(t));
}

inline void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  PPOISON_CHECK(t.device() == ref.device(), "ppoison: ", name, " is on ", device_str(t), " but ", ref_name,
                " is on ", device_str(ref), "; all tensors must be on the same device");
  PPOISON_CHECK(t.scalar_type() == ref.scalar_type(), "ppoison: ", name, " has dtype ", dtype_str(t.scalar_type()),
                " but ", ref_name, " has dtype ", dtype_str(ref.scalar_type()), "; dtypes must match");
}

inline void check_size(const Tensor& t, int64_t dim, int64_t expected, const char* name, const char* what) {
  PPOISON_CHECK(t.size(dim) == expected, "ppoison: ", name, " has ", t.size(dim), " ", what, " (dim ", dim,
                    ") but ", expected, " were expected from the other arguments; got shape ", shape_str(t));
}

inline void check_classes(int64_t K, const char* name) {
  PPOISON_CHECK(K >= 2, "ppoison: ", name, " must have at least 2 classes (K >= 2), got K = ", K);
}

inline void check_finite_scalar(double v, const char* name) {
  PPOISON_CHECK(std::isfinite(v), "ppoison: ", name, " must be finite, got ", v);
}

// Raises when a kernel saw a NaN/Inf while reading `name`.
inline void report_nonfinite(bool bad, const char* name) {
  PPOISON_CHECK(!bad, "ppoison: ", name, " contains NaN or Inf values");
}

// Whether all n values are finite (the CPU kernels' in-loop check).
template <typename scalar_t>
bool finite_row(const scalar_t* v, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite((double)v[i]);
  return ok;
}


// Value checks of several tensors with one copy to the host (one device sync on a GPU), in
// ATen's arithmetic: per check whether `t` is all finite (FiniteNonneg: and >= 0). Undefined
// and empty tensors pass.
enum class ValueCheck { Finite, FiniteNonneg };

struct NamedCheck {
  const Tensor& t;
  const char* name;
  ValueCheck kind;
};

inline std::vector<char> values_ok(std::initializer_list<NamedCheck> checks) {
  std::vector<Tensor> flags;
  for (const NamedCheck& c : checks) {
    if (!c.t.defined() || c.t.numel() == 0) continue;
    Tensor ok = call_aten<1>("aten::isfinite", "", c.t)[0];
    if (c.kind == ValueCheck::FiniteNonneg) {  // |t| == t, i.e. t >= 0 (or -0.0), without a Scalar
      const Tensor nonneg = call_aten<1>("aten::eq", "Tensor", call_aten<1>("aten::abs", "", c.t)[0], c.t)[0];
      ok = call_aten<1>("aten::logical_and", "", ok, nonneg)[0];
    }
    flags.push_back(call_aten<1>("aten::all", "", ok)[0]);
  }
  std::vector<char> result(checks.size(), 1);
  if (flags.empty()) return result;
  const Tensor stacked = call_aten<1>("aten::stack", "", flags, int64_t(0))[0];
  const Tensor host = torch::stable::to(stacked, torch::stable::Device(torch::headeronly::DeviceType::CPU));
  const bool* ok = host.const_data_ptr<bool>();
  size_t i = 0, j = 0;
  for (const NamedCheck& c : checks) {
    if (c.t.defined() && c.t.numel() > 0) result[j] = ok[i++];
    ++j;
  }
  return result;
}

// values_ok, raising the CPU kernels' errors in the order given: Finite → report_nonfinite(name);
// FiniteNonneg → "ppoison: <name> must be finite and >= 0".
inline void check_values(std::initializer_list<NamedCheck> checks) {
  const std::vector<char> ok = values_ok(checks);
  size_t i = 0;
  for (const NamedCheck& c : checks) {
    const bool bad = !ok[i++];
    if (c.kind == ValueCheck::Finite) {
      report_nonfinite(bad, c.name);
    } else {
      PPOISON_CHECK(!bad, "ppoison: ", c.name, " must be finite and >= 0");
    }
  }
}

// Gram arguments of mad_oracle / mad_objective: either an explicit `gram` [B, K, K]
// or the FC form (`p` [B, K], `h_sqnorm` [B]); neither means the identity.
struct GramArgs {
  bool dense;
  Tensor p, hsq, gram;
};

inline GramArgs check_gram_args(const Tensor& y, const OptTensor& p,
                                const OptTensor& h_sqnorm, const OptTensor& gram) {
  const int64_t B = y.size(0), K = y.size(1);
  GramArgs g;
  g.dense = gram.has_value();
  if (g.dense) {
    PPOISON_CHECK(!p.has_value() && !h_sqnorm.has_value(),
                      "ppoison: pass either gram or (p, h_sqnorm), not both");
    check_float(*gram, "gram");
    check_dim(*gram, 3, "gram", "[B, K, K]");
    check_like(*gram, "gram", y, "y");
    check_size(*gram, 0, B, "gram", "samples");
    check_size(*gram, 1, K, "gram", "classes");
    check_size(*gram, 2, K, "gram", "classes");
    g.gram = as_contiguous(*gram);
    return g;
  }
  if (p.has_value()) {
    check_float(*p, "p");
    check_dim(*p, 2, "p", "[B, K]");
    check_like(*p, "p", y, "y");
    check_size(*p, 0, B, "p", "samples");
    check_size(*p, 1, K, "p", "classes");
    g.p = as_contiguous(*p);
  }
  if (h_sqnorm.has_value()) {
    check_float(*h_sqnorm, "h_sqnorm");
    check_dim(*h_sqnorm, 1, "h_sqnorm", "[B]");
    check_like(*h_sqnorm, "h_sqnorm", y, "y");
    check_size(*h_sqnorm, 0, B, "h_sqnorm", "samples");
    g.hsq = as_contiguous(*h_sqnorm);
  }
  return g;
}

inline void check_step_args(const Tensor& y, const Tensor& ys, double epsilon, int64_t kl_steps) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_classes(y.size(1), "y");
  check_float(ys, "y_star");
  check_dim(ys, 2, "y_star", "[B, K]");
  check_like(ys, "y_star", y, "y");
  check_size(ys, 0, y.size(0), "y_star", "samples");
  check_size(ys, 1, y.size(1), "y_star", "classes");
  PPOISON_CHECK(std::isfinite(epsilon) && epsilon >= 0.0, "ppoison: epsilon must be finite and >= 0, got ",
                    epsilon);
  PPOISON_CHECK(kl_steps >= 0 && kl_steps <= 64, "ppoison: kl_steps must be in [0, 64], got ", kl_steps);
}

// Arguments of mad_oracle, contiguous, with the parsed option.
struct OracleInputs {
  Oracle oracle;
  GramArgs gram;
  Tensor y, index;  // index: defined for oracle 'random'
};

inline OracleInputs check_oracle_args(const Tensor& y, const OptTensor& p,
                                      const OptTensor& h_sqnorm,
                                      const OptTensor& gram, std::string_view oracle,
                                      int64_t exact_max_k, int64_t max_candidates,
                                      const OptTensor& index) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_classes(y.size(1), "y");
  OracleInputs in;
  in.oracle = parse_oracle(oracle);
  PPOISON_CHECK(exact_max_k >= 0 && exact_max_k <= 24, "ppoison: exact_max_k must be in [0, 24], got ",
                    exact_max_k);
  PPOISON_CHECK(max_candidates >= 1, "ppoison: max_candidates must be >= 1, got ", max_candidates);
  in.gram = check_gram_args(y, p, h_sqnorm, gram);
  const int64_t B = y.size(0), K = y.size(1);
  in.y = as_contiguous(y);
  if (in.oracle == Oracle::Random) {
    PPOISON_CHECK(index.has_value(), "ppoison: oracle 'random' needs index, a [B] int64 tensor of classes");
    PPOISON_CHECK(index->scalar_type() == ScalarType::Long, "ppoison: index must be an int64 tensor, got ",
                  dtype_str(index->scalar_type()));
    check_dim(*index, 1, "index", "[B]");
    PPOISON_CHECK(index->device() == y.device(), "ppoison: index is on ", device_str(*index), " but y is on ",
                  device_str(y));
    check_size(*index, 0, B, "index", "samples");
    in.index = as_contiguous(*index);
    if (B > 0) {
      // read on the host: B int64s, one copy from a GPU
      const Tensor host = in.index.is_cpu() ? in.index : torch::stable::to(in.index, torch::stable::Device(torch::headeronly::DeviceType::CPU));
      const int64_t* ip = host.const_data_ptr<int64_t>();
      bool ok = true;
      for (int64_t b = 0; b < B; ++b) ok &= ip[b] >= 0 && ip[b] < K;
      PPOISON_CHECK(ok, "ppoison: index values must be in [0, K) = [0, ", K, ")");
    }
  }
  return in;
}

// Checked, contiguous arguments of mad_objective and its outputs obj, sur [B].
struct ObjectiveCall {
  GramArgs gram;
  Tensor yt, y, obj, sur;
};

inline ObjectiveCall objective_call(const Tensor& yt, const Tensor& y, const OptTensor& p,
                                    const OptTensor& h_sqnorm,
                                    const OptTensor& gram) {
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
  c.yt = as_contiguous(yt);
  c.y = as_contiguous(y);
  c.obj = new_tensor(y, {y.size(0)});
  c.sur = new_tensor(y, {y.size(0)});
  return c;
}

inline void check_project_args(const Tensor& v, double radius) {
  check_float(v, "v");
  check_dim(v, 2, "v", "[B, K]");
  PPOISON_CHECK(v.size(1) >= 1, "ppoison: v must have at least one column, got shape ", shape_str(v));
  PPOISON_CHECK(std::isfinite(radius) && radius > 0.0, "ppoison: radius must be finite and > 0, got ", radius);
}

inline void check_gram_fc_args(const Tensor& p, const Tensor& h_sqnorm) {
  check_float(p, "p");
  check_dim(p, 2, "p", "[B, K]");
  check_classes(p.size(1), "p");
  check_float(h_sqnorm, "h_sqnorm");
  check_dim(h_sqnorm, 1, "h_sqnorm", "[B]");
  check_like(h_sqnorm, "h_sqnorm", p, "p");
  check_size(h_sqnorm, 0, p.size(0), "h_sqnorm", "samples");
}

inline void check_tvec_fc_args(const Tensor& p, const Tensor& h, const Tensor& y) {
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

inline void check_jacobian_args(const Tensor& G) {
  check_float(G, "G");
  check_dim(G, 3, "G", "[B, K, D]");
  check_classes(G.size(1), "G");
}

inline void check_tvec_args(const Tensor& G, const Tensor& y) {
  check_jacobian_args(G);
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_like(y, "y", G, "G");
  check_size(y, 0, G.size(0), "y", "samples");
  check_size(y, 1, G.size(1), "y", "classes");
}

}  // namespace ppoison
