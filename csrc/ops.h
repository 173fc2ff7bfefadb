// Declarations of the ppoison kernels; schemas live in ops.cpp.
#pragma once

#include "stable.h"

#include <tuple>

namespace ppoison {

// G·Gᵀ [B, K, K] of the last-Linear NLL Jacobian, from p [B, K] and ‖h‖² [B].
Tensor jacobian_gram_fc_cpu(const Tensor& p, const Tensor& h_sqnorm);
// Gᵀy [B, K·H] = vec((Σy·p − y) hᵀ) of the last-Linear NLL Jacobian.
Tensor jacobian_tvec_fc_cpu(const Tensor& p, const Tensor& h, const Tensor& y);
// G·Gᵀ [B, K, K] of explicit Jacobians G [B, K, D].
Tensor jacobian_gram_cpu(const Tensor& G);
// Gᵀy [B, D] of explicit Jacobians G [B, K, D].
Tensor jacobian_tvec_cpu(const Tensor& G, const Tensor& y);
// Per-sample target vertex y* [B, K] and its objective value [B].
std::tuple<Tensor, Tensor> mad_oracle_cpu(const Tensor& y, const OptTensor& p,
                                                  const OptTensor& h_sqnorm,
                                                  const OptTensor& gram, std::string_view oracle,
                                                  bool objmax, int64_t exact_max_k, int64_t max_candidates,
                                                  const OptTensor& index);
// Angular objective and surrogate [B] of y_tilde against y.
std::tuple<Tensor, Tensor> mad_objective_cpu(const Tensor& y_tilde, const Tensor& y,
                                                     const OptTensor& p,
                                                     const OptTensor& h_sqnorm,
                                                     const OptTensor& gram);
// y + α(y* − y) with the reference's line-search α for the l1/l2/kl ball.
Tensor mad_step_cpu(const Tensor& y, const Tensor& y_star, double epsilon, std::string_view ydist,
                        int64_t kl_steps);
// Euclidean projection of each row onto {x ≥ 0, Σx = radius}.
Tensor project_simplex_cpu(const Tensor& v, double radius);
// Euclidean projection of each row onto {‖x‖₁ ≤ radius}.
Tensor project_l1_ball_cpu(const Tensor& v, double radius);
// ModelGuard-W per row: argmin Σ log(y + offset)·x on the simplex, ‖x − y‖₁ ≤ ε, top-1 margin;
// returns (x, objective, feasible).
std::tuple<Tensor, Tensor, Tensor> modelguard_w_solve_cpu(const Tensor& y, double epsilon,
                                                                      double margin, double log_offset);

// GRAD² allocation ỹ [B, E, K]: mass ≤ ε/2 moved onto argmin c from the largest-c classes.
Tensor grad2_allocate_cpu(const Tensor& p, const Tensor& c, torch::headeronly::HeaderOnlyArrayRef<double> epsilons);

#ifdef USE_CUDA  // declared for csrc/cuda (ppoison_ext._C_cuda)
Tensor grad2_allocate_cuda(const Tensor& p, const Tensor& c, torch::headeronly::HeaderOnlyArrayRef<double> epsilons);
Tensor jacobian_gram_fc_cuda(const Tensor& p, const Tensor& h_sqnorm);
Tensor jacobian_tvec_fc_cuda(const Tensor& p, const Tensor& h, const Tensor& y);
Tensor jacobian_gram_cuda(const Tensor& G);
Tensor jacobian_tvec_cuda(const Tensor& G, const Tensor& y);
std::tuple<Tensor, Tensor> mad_oracle_cuda(const Tensor& y, const OptTensor& p,
                                                   const OptTensor& h_sqnorm,
                                                   const OptTensor& gram, std::string_view oracle,
                                                   bool objmax, int64_t exact_max_k, int64_t max_candidates,
                                                   const OptTensor& index);
std::tuple<Tensor, Tensor> mad_objective_cuda(const Tensor& y_tilde, const Tensor& y,
                                                      const OptTensor& p,
                                                      const OptTensor& h_sqnorm,
                                                      const OptTensor& gram);
Tensor mad_step_cuda(const Tensor& y, const Tensor& y_star, double epsilon, std::string_view ydist,
                         int64_t kl_steps);
Tensor project_simplex_cuda(const Tensor& v, double radius);
Tensor project_l1_ball_cuda(const Tensor& v, double radius);
std::tuple<Tensor, Tensor, Tensor> modelguard_w_solve_cuda(const Tensor& y, double epsilon,
                                                                       double margin, double log_offset);
#endif

}  // namespace ppoison
