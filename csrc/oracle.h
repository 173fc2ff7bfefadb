// The MAD perturbation-direction search of one sample row, shared by the CPU kernel
// (torch::stable::parallel_for over rows) and the CUDA kernel (a thread per row); math in mad_math.h.
//   extreme: argmax_k value(e_k)
//   argmax:  K ≤ exact_max_k: all 2^(K−1) vertices ∋ k* (oracle_argmax_exact + mask_from_rank)
//            otherwise the reference's greedy growth on the smoothed y (oracle_argmax_greedy)
//   argmin / random: e_k for k = argmin y / the given index
#pragma once

#include <cstdint>

#include "mad_math.h"

namespace ppoison {

struct OracleArgs {
  Oracle oracle;
  bool objmax;
  bool greedy;  // argmax with K > exact_max_k
  int64_t max_candidates;
};

// K-entry scratch of one row: mask (argmax), order and ysmooth (greedy), my (dense Gram) and
// r (dense greedy); the ones a search does not use may be nullptr.
template <typename scalar_t>
struct OracleScratch {
  unsigned char* mask;
  int* order;
  scalar_t* ysmooth;
  double* my;
  double* r;
};

// The reference smooths y in its own dtype before the greedy search.
template <typename scalar_t>
PP_HD void smooth(const scalar_t* y, int K, scalar_t* out) {
  double s = 0.0;
  for (int k = 0; k < K; ++k) {
    out[k] = y[k] + (scalar_t)kGreedySmooth;
    s += (double)out[k];
  }
  for (int k = 0; k < K; ++k) out[k] = (scalar_t)((double)out[k] / s);
}

// Every oracle but the greedy argmax: writes y* and returns its value.
template <typename scalar_t, typename Gram>
PP_HD double oracle_pick(const Gram& g, const OracleArgs& a, int64_t index, const scalar_t* y,
                         unsigned char* mask, scalar_t* ystar) {
  const int K = g.K;
  double v = 0.0;
  for (int k = 0; k < K; ++k) ystar[k] = 0;
  if (a.oracle == Oracle::Argmax) {
    const int kstar = argmax_first(y, K);
    const int64_t rank = oracle_argmax_exact(g, kstar, a.objmax, &v);
    mask_from_rank(rank, K, kstar, mask);
    write_vertex(mask, K, kstar, ystar);
    return v;
  }
  int k = 0;
  if (a.oracle == Oracle::Extreme) {
    k = oracle_extreme(g, a.objmax, &v);
  } else {
    k = a.oracle == Oracle::Argmin ? argmin_first(y, K) : (int)index;
    v = g.value(g.single(k), a.objmax);
  }
  ystar[k] = 1;
  return v;
}

// The greedy argmax search on the smoothed-y Gram gs: writes y* and returns its value.
template <typename scalar_t, typename Gram, typename Set>
PP_HD double oracle_pick_greedy(const Gram& gs, Set set, int kstar, const OracleArgs& a, unsigned char* mask,
                                int* order, scalar_t* ystar) {
  const int K = gs.K;
  int t = 0, c = kstar;
  double v = 0.0;
  oracle_argmax_greedy(gs, set, kstar, true, a.max_candidates, mask, order, &t, &c, &v);
  for (int k = 0; k < K; ++k) mask[k] = 0;
  mask[kstar] = 1;
  for (int i = 0; i < t; ++i) mask[order[i]] = 1;
  mask[c] = 1;
  write_vertex(mask, K, kstar, ystar);
  return v;
}

// FC / identity Gram: p (nullptr: identity) and ‖h‖².
template <typename scalar_t>
PP_HD void oracle_row_fc(const scalar_t* y, const scalar_t* p, double hsq, int64_t index, int K,
                         const OracleArgs& a, const OracleScratch<scalar_t>& s, scalar_t* ystar, scalar_t* value) {
  FcGram<scalar_t> g;
  double v = 0.0;
  if (a.greedy) {
    smooth(y, K, s.ysmooth);
    g.init(s.ysmooth, p, hsq, K);
    v = oracle_pick_greedy(g, g.empty_set(), argmax_first(y, K), a, s.mask, s.order, ystar);
  } else {
    g.init(y, p, hsq, K);
    v = oracle_pick(g, a, index, y, s.mask, ystar);
  }
  *value = (scalar_t)v;
}

// Dense Gram M [K, K].
template <typename scalar_t>
PP_HD void oracle_row_dense(const scalar_t* y, const scalar_t* M, int64_t index, int K, const OracleArgs& a,
                            const OracleScratch<scalar_t>& s, scalar_t* ystar, scalar_t* value) {
  DenseGram<scalar_t> g;
  double v = 0.0;
  if (a.greedy) {
    smooth(y, K, s.ysmooth);
    g.init(s.ysmooth, M, K, s.my);
    v = oracle_pick_greedy(g, g.empty_set(s.r), argmax_first(y, K), a, s.mask, s.order, ystar);
  } else {
    g.init(y, M, K, s.my);
    v = oracle_pick(g, a, index, y, s.mask, ystar);
  }
  *value = (scalar_t)v;
}

}  // namespace ppoison
