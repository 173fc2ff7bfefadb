// Euclidean projections of each row v [K]:
//   simplex(s): argmin ‖x − v‖₂ s.t. x ≥ 0, Σx = s;  x = max(v − τ, 0)
//   l1 ball(s): v if ‖v‖₁ ≤ s, else sign(v) ⊙ simplex_s(|v|)
// τ by Condat's algorithm (Condat 2016, "Fast projection onto the simplex and
// the l1 ball"), O(K) expected, in double. One task per row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "../utils.h"

namespace ppoison {

namespace {

// τ with Σ max(u − τ, 0) = s (Condat 2016, Algorithm 1 as described in §3).
double condat_tau(const double* u, int64_t K, double s, std::vector<double>& v, std::vector<double>& vt) {
  v.clear();
  vt.clear();
  v.push_back(u[0]);
  double rho = u[0] - s;
  for (int64_t n = 1; n < K; ++n) {
    const double yn = u[n];
    if (yn > rho) {
      rho += (yn - rho) / (double)(v.size() + 1);
      if (rho > yn - s) {
        v.push_back(yn);
      } else {
        vt.insert(vt.end(), v.begin(), v.end());
        v.clear();
        v.push_back(yn);
        rho = yn - s;
      }
    }
  }
  for (double yv : vt) {
    if (yv > rho) {
      v.push_back(yv);
      rho += (yv - rho) / (double)v.size();
    }
  }
  bool changed = true;
  while (changed) {
    changed = false;
    size_t w = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      const double yv = v[i];
      if (yv <= rho && v.size() - (i - w) > 1) {
        // removing yv leaves |v| − 1 active elements
        const size_t remaining = v.size() - (i - w) - 1;
        rho += (rho - yv) / (double)remaining;
        changed = true;
        continue;
      }
      v[w++] = yv;
    }
    v.resize(w);
  }
  return rho;
}

template <typename scalar_t>
void project_rows(const at::Tensor& v, at::Tensor& out, double radius, bool l1, std::atomic<bool>& bad) {
  const int64_t B = v.size(0), K = v.size(1);
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)), [&](int64_t b0, int64_t b1) {
    std::vector<double> u(K), act, rest;
    act.reserve(K);
    rest.reserve(K);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* vr = vp + b * K;
      scalar_t* o = op + b * K;
      double sum = 0.0, abs_sum = 0.0;
      bool nonneg = true, finite = true;
      for (int64_t k = 0; k < K; ++k) {
        const double x = (double)vr[k];
        finite &= std::isfinite(x);
        sum += x;
        abs_sum += std::fabs(x);
        nonneg &= x >= 0.0;
        u[k] = l1 ? std::fabs(x) : x;
      }
      if (!finite) {
        bad = true;
        for (int64_t k = 0; k < K; ++k) o[k] = 0;
        continue;
      }
      // Already feasible: the reference returns v unchanged.
      if ((l1 && abs_sum <= radius) || (!l1 && nonneg && sum == radius)) {
        for (int64_t k = 0; k < K; ++k) o[k] = vr[k];
        continue;
      }
      const double tau = condat_tau(u.data(), K, radius, act, rest);
      for (int64_t k = 0; k < K; ++k) {
        const double x = u[k] - tau;
        const double m = x > 0.0 ? x : 0.0;
        o[k] = (scalar_t)(l1 && vr[k] < 0 ? -m : m);
      }
    }
  });
}

at::Tensor project_impl(const at::Tensor& v_, double radius, bool l1) {
  check_float(v_, "v");
  check_dim(v_, 2, "v", "[B, K]");
  TORCH_CHECK_VALUE(v_.size(1) >= 1, "ppoison: v must have at least one column, got shape ", v_.sizes());
  TORCH_CHECK_VALUE(std::isfinite(radius) && radius > 0.0, "ppoison: radius must be finite and > 0, got ", radius);
  auto v = v_.contiguous();
  auto out = at::empty_like(v);
  if (v.size(0) == 0) return out;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "project_cpu", [&] { project_rows<scalar_t>(v, out, radius, l1, bad); });
  report_nonfinite(bad, "v");
  return out;
}

}  // namespace

at::Tensor project_simplex_cpu(const at::Tensor& v, double radius) { return project_impl(v, radius, false); }

at::Tensor project_l1_ball_cpu(const at::Tensor& v, double radius) { return project_impl(v, radius, true); }

TORCH_LIBRARY_IMPL(ppoison, CPU, m) {
  m.impl("project_simplex", &project_simplex_cpu);
  m.impl("project_l1_ball", &project_l1_ball_cpu);
}

}  // namespace ppoison
