// Declarations of the ppoison kernels; schemas live in ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ppoison {

// G·Gᵀ [B, K, K] of the last-Linear NLL Jacobian, from p [B, K] and ‖h‖² [B].
at::Tensor jacobian_gram_fc_cpu(const at::Tensor& p, const at::Tensor& h_sqnorm);
// Gᵀy [B, K·H] = vec((Σy·p − y) hᵀ) of the last-Linear NLL Jacobian.
at::Tensor jacobian_tvec_fc_cpu(const at::Tensor& p, const at::Tensor& h, const at::Tensor& y);
// G·Gᵀ [B, K, K] of explicit Jacobians G [B, K, D].
at::Tensor jacobian_gram_cpu(const at::Tensor& G);
// Gᵀy [B, D] of explicit Jacobians G [B, K, D].
at::Tensor jacobian_tvec_cpu(const at::Tensor& G, const at::Tensor& y);
// Per-sample target vertex y* [B, K] and its objective value [B].
std::tuple<at::Tensor, at::Tensor> mad_oracle_cpu(const at::Tensor& y, const c10::optional<at::Tensor>& p,
                                                  const c10::optional<at::Tensor>& h_sqnorm,
                                                  const c10::optional<at::Tensor>& gram, c10::string_view oracle,
                                                  bool objmax, int64_t exact_max_k, int64_t max_candidates,
                                                  const c10::optional<at::Tensor>& index);
// Angular objective and surrogate [B] of y_tilde against y.
std::tuple<at::Tensor, at::Tensor> mad_objective_cpu(const at::Tensor& y_tilde, const at::Tensor& y,
                                                     const c10::optional<at::Tensor>& p,
                                                     const c10::optional<at::Tensor>& h_sqnorm,
                                                     const c10::optional<at::Tensor>& gram);
// y + α(y* − y) with the reference's line-search α for the l1/l2/kl ball.
at::Tensor mad_step_cpu(const at::Tensor& y, const at::Tensor& y_star, double epsilon, c10::string_view ydist,
                        int64_t kl_steps);
// Euclidean projection of each row onto {x ≥ 0, Σx = radius}.
at::Tensor project_simplex_cpu(const at::Tensor& v, double radius);
// Euclidean projection of each row onto {‖x‖₁ ≤ radius}.
at::Tensor project_l1_ball_cpu(const at::Tensor& v, double radius);
// ModelGuard-W per row: argmin Σ log(y + offset)·x on the simplex, ‖x − y‖₁ ≤ ε, top-1 margin;
// returns (x, objective, feasible).
std::tuple<at::Tensor, at::Tensor, at::Tensor> modelguard_w_solve_cpu(const at::Tensor& y, double epsilon,
                                                                      double margin, double log_offset);

// GRAD² allocation ỹ [B, E, K]: mass ≤ ε/2 moved onto argmin c from the largest-c classes.
at::Tensor grad2_allocate_cpu(const at::Tensor& p, const at::Tensor& c, c10::ArrayRef<double> epsilons);

#ifdef WITH_CUDA
at::Tensor grad2_allocate_cuda(const at::Tensor& p, const at::Tensor& c, c10::ArrayRef<double> epsilons);
at::Tensor jacobian_gram_fc_cuda(const at::Tensor& p, const at::Tensor& h_sqnorm);
at::Tensor jacobian_tvec_fc_cuda(const at::Tensor& p, const at::Tensor& h, const at::Tensor& y);
at::Tensor jacobian_gram_cuda(const at::Tensor& G);
at::Tensor jacobian_tvec_cuda(const at::Tensor& G, const at::Tensor& y);
std::tuple<at::Tensor, at::Tensor> mad_oracle_cuda(const at::Tensor& y, const c10::optional<at::Tensor>& p,
                                                   const c10::optional<at::Tensor>& h_sqnorm,
                                                   const c10::optional<at::Tensor>& gram, c10::string_view oracle,
                                                   bool objmax, int64_t exact_max_k, int64_t max_candidates,
                                                   const c10::optional<at::Tensor>& index);
std::tuple<at::Tensor, at::Tensor> mad_objective_cuda(const at::Tensor& y_tilde, const at::Tensor& y,
                                                      const c10::optional<at::Tensor>& p,
                                                      const c10::optional<at::Tensor>& h_sqnorm,
                                                      const c10::optional<at::Tensor>& gram);
at::Tensor mad_step_cuda(const at::Tensor& y, const at::Tensor& y_star, double epsilon, c10::string_view ydist,
                         int64_t kl_steps);
at::Tensor project_simplex_cuda(const at::Tensor& v, double radius);
at::Tensor project_l1_ball_cuda(const at::Tensor& v, double radius);
std::tuple<at::Tensor, at::Tensor, at::Tensor> modelguard_w_solve_cuda(const at::Tensor& y, double epsilon,
                                                                       double margin, double log_offset);
#endif

}  // namespace ppoison
