// Argument checks and preparation of modelguard_w_solve, shared by the CPU and CUDA entry
// points (TypeError for dtypes, ValueError for shapes and values, as utils.h).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "utils.h"

namespace ppoison {

inline void check_modelguard_w_args(const at::Tensor& y, double epsilon, double margin, double log_offset) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[B, K]");
  check_classes(y.size(1), "y");
  TORCH_CHECK_VALUE(std::isfinite(epsilon) && epsilon >= 0.0, "ppoison: epsilon must be finite and >= 0, got ",
                    epsilon);
  TORCH_CHECK_VALUE(std::isfinite(margin) && margin >= 0.0 && margin < 1.0,
                    "ppoison: margin must be finite and in [0, 1), got ", margin);
  TORCH_CHECK_VALUE(std::isfinite(log_offset) && log_offset > 0.0, "ppoison: log_offset must be finite and > 0, got ",
                    log_offset);
}

// One device sync: y finite and >= 0.
inline void check_modelguard_w_values(const at::Tensor& y) {
  if (y.numel() == 0) return;
  const bool ok = at::logical_and(at::isfinite(y), y.ge(0)).all().item<bool>();
  TORCH_CHECK_VALUE(ok, "ppoison: y must be finite and >= 0 (NaN, Inf or a negative entry found)");
}

// The classes in ascending c = log(y + offset) (float64), ties by index, with y (float64) and c
// in that order: (order, ys, cs), [B, K] each.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> modelguard_w_costs(const at::Tensor& y, double log_offset) {
  at::Tensor yd = y.to(at::kDouble);
  auto [cs, order] = at::log(yd + log_offset).sort(/*stable=*/true, /*dim=*/1, /*descending=*/false);
  return {order.contiguous(), yd.gather(1, order).contiguous(), cs.contiguous()};
}

// A checked call: y contiguous, the outputs allocated (x [B, K], objective [B], feasible [B]),
// and, when B > 0 and y passed the value check, the sorted inputs of modelguard_w_costs.
struct ModelguardWCall {
  at::Tensor y, out, obj, feas, order, ys, cs;
};

inline ModelguardWCall modelguard_w_prepare(const at::Tensor& y_, double epsilon, double margin, double log_offset) {
  check_modelguard_w_args(y_, epsilon, margin, log_offset);
  ModelguardWCall c;
  const int64_t B = y_.size(0), K = y_.size(1);
  c.y = y_.contiguous();
  c.out = at::empty({B, K}, c.y.options());
  c.obj = at::empty({B}, c.y.options());
  c.feas = at::empty({B}, c.y.options().dtype(at::kBool));
  if (B == 0) return c;
  check_modelguard_w_values(c.y);
  std::tie(c.order, c.ys, c.cs) = modelguard_w_costs(c.y, log_offset);
  return c;
}

}  // namespace ppoison
