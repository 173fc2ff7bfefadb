// Euclidean projections of each row v [K] onto the simplex {x ≥ 0, Σx = s} and the l1 ball
// {‖x‖₁ ≤ s}: project_row of projection.h (Michelot's algorithm, shared with CUDA).
// One task per row.

#include <atomic>

#include "../ops.h"
#include "../projection.h"
#include "../utils.h"

namespace ppoison {

namespace {

Tensor project_impl(const Tensor& v_, double radius, bool l1) {
  check_project_args(v_, radius);
  auto v = as_contiguous(v_);
  auto out = new_tensor(v, {v.size(0), v.size(1)});
  const int64_t B = v.size(0), K = v.size(1);
  if (B == 0) return out;
  std::atomic<bool> bad{false};
  PPOISON_DISPATCH_FLOATING_TYPES(v.scalar_type(), "project_cpu", [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, B, std::max<int64_t>(1, 8192 / K), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        if (!project_row(vp + b * K, (int)K, radius, l1, op + b * K)) bad = true;
    });
  });
  report_nonfinite(bad, "v");
  return out;
}

}  // namespace

Tensor project_simplex_cpu(const Tensor& v, double radius) { return project_impl(v, radius, false); }

Tensor project_l1_ball_cpu(const Tensor& v, double radius) { return project_impl(v, radius, true); }

STABLE_TORCH_LIBRARY_IMPL(ppoison, CPU, m) {
  m.impl("project_simplex", TORCH_BOX(&project_simplex_cpu));
  m.impl("project_l1_ball", TORCH_BOX(&project_l1_ball_cpu));
}

}  // namespace ppoison
