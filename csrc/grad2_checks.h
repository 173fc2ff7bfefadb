// Argument checks of grad2_allocate, shared by the CPU and CUDA entry points.
#pragma once


#include "utils.h"

namespace ppoison {

inline void check_grad2_args(const Tensor& p, const Tensor& c, torch::headeronly::HeaderOnlyArrayRef<double> epsilons) {
  check_float(p, "p");
  check_dim(p, 2, "p", "[B, K]");
  check_classes(p.size(1), "p");
  check_float(c, "c");
  check_dim(c, 2, "c", "[B, K]");
  check_like(c, "c", p, "p");
  check_size(c, 0, p.size(0), "c", "samples");
  check_size(c, 1, p.size(1), "c", "classes");
  PPOISON_CHECK(!epsilons.empty(), "ppoison: epsilons must hold at least one budget");
  for (double e : epsilons)
    PPOISON_CHECK(std::isfinite(e) && e >= 0.0, "ppoison: every epsilon must be finite and >= 0, got ", e);
}

}  // namespace ppoison
