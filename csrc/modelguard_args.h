// Argument checks and preparation of modelguard_w_solve, shared by the CPU and CUDA entry
// points (TypeError for dtypes, ValueError for shapes and values, as utils.h).
#pragma once


#include <cmath>
#include <tuple>

#include "utils.h"

namespace ppoison {

inline void check_modelguard_w_args(const Tensor& y, double epsilon, double margin, double log_offset) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_classes(y.size(1), "y");
  PPOISON_CHECK(std::isfinite(epsilon) && epsilon >= 0.0, "ppoison: epsilon must be finite and >= 0, got ",
                    epsilon);
  PPOISON_CHECK(std::isfinite(margin) && margin >= 0.0 && margin < 1.0,
                    "ppoison: margin must be finite and in [0, 1), got ", margin);
  PPOISON_CHECK(std::isfinite(log_offset) && log_offset > 0.0, "ppoison: log_offset must be finite and > 0, got ",
                    log_offset);
}

// One device sync: y finite and >= 0.
inline void check_modelguard_w_values(const Tensor& y) {
  PPOISON_CHECK(values_ok({{y, "y", ValueCheck::FiniteNonneg}})[0],
                "ppoison: y must be finite and >= 0 (NaN, Inf or a negative entry found)");
}

// The classes in ascending c = log(y + offset) (float64), ties by index, with y (float64) and c
// in that order: (order, ys, cs), [B, K] each.
inline std::tuple<Tensor, Tensor, Tensor> modelguard_w_costs(const Tensor& y, double log_offset) {
  const Tensor yd = torch::stable::to(y, ScalarType::Double);
  // yd + offset as yd − (−offset): the stable ABI's subtract takes a tensor, not a Scalar
  const Tensor minus_offset =
      torch::stable::full(torch::headeronly::IntHeaderOnlyArrayRef(), -log_offset, ScalarType::Double, std::nullopt, y.device());
  const Tensor c = call_aten<1>("aten::log", "", torch::stable::subtract(yd, minus_offset))[0];
  const auto sorted = call_aten<2>("aten::sort", "stable", c, std::optional<bool>(true), int64_t(1), false);
  const Tensor ys = call_aten<1>("aten::gather", "", yd, int64_t(1), sorted[1], false)[0];
  return {as_contiguous(sorted[1]), as_contiguous(ys), as_contiguous(sorted[0])};
}

// A checked call: y contiguous, the outputs allocated (x [B, K], objective [B], feasible [B]),
// and, when B > 0 and y passed the value check, the sorted inputs of modelguard_w_costs.
struct ModelguardWCall {
  Tensor y, out, obj, feas, order, ys, cs;
};

inline ModelguardWCall modelguard_w_prepare(const Tensor& y_, double epsilon, double margin, double log_offset) {
  check_modelguard_w_args(y_, epsilon, margin, log_offset);
  ModelguardWCall c;
  const int64_t B = y_.size(0), K = y_.size(1);
  c.y = as_contiguous(y_);
  c.out = new_tensor(c.y, {B, K});
  c.obj = new_tensor(c.y, {B});
  c.feas = new_tensor(c.y, {B}, ScalarType::Bool);
  if (B == 0) return c;
  check_modelguard_w_values(c.y);
  std::tie(c.order, c.ys, c.cs) = modelguard_w_costs(c.y, log_offset);
  return c;
}

}  // namespace ppoison
