// Launch geometry, warp reductions and input checks shared by the CUDA kernels.
//   elementwise kernels: THREADS threads per block, BLOCKS(n) blocks, grid-stride loops;
//   row kernels:         a warp per row, ROWS_PER_BLOCK rows per block, WARP_BLOCKS(rows) blocks.
// Only included from csrc/cuda/*.cu (nvcc).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "../utils.h"

namespace ppoison {

constexpr int THREADS = 256;
constexpr int WARP_SIZE = 32;
constexpr int ROWS_PER_BLOCK = THREADS / WARP_SIZE;
constexpr unsigned FULL_MASK = 0xffffffffu;
// Grid cap: every kernel loops grid-stride, so a capped grid still covers all work.
constexpr int64_t MAX_BLOCKS = 65535LL * 32;

inline unsigned int BLOCKS(int64_t n, int threads = THREADS) {
  const int64_t b = (n + threads - 1) / threads;
  return (unsigned int)std::max<int64_t>(1, std::min<int64_t>(b, MAX_BLOCKS));
}

inline unsigned int WARP_BLOCKS(int64_t rows) { return BLOCKS(rows, ROWS_PER_BLOCK); }

// Sum over the warp; the xor butterfly leaves the bitwise-same total in every lane.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ bool warp_any(bool v) { return __any_sync(FULL_MASK, v) != 0; }
__device__ __forceinline__ bool warp_all(bool v) { return __all_sync(FULL_MASK, v) != 0; }

template <typename T>
__device__ __forceinline__ T warp_broadcast(T v, int lane) {
  return __shfl_sync(FULL_MASK, v, lane);
}

// Warp-per-row loops: the first row of this warp, the stride between rows, the lane.
__device__ __forceinline__ int64_t warp_row0() {
  return (int64_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP_SIZE;
}
__device__ __forceinline__ int64_t warp_row_stride() { return (int64_t)gridDim.x * ROWS_PER_BLOCK; }
__device__ __forceinline__ int lane_id() { return threadIdx.x % WARP_SIZE; }

// Thread-per-element loops.
__device__ __forceinline__ int64_t thread_id0() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t thread_stride() { return (int64_t)gridDim.x * blockDim.x; }

// Called after the shared argument checks (utils.h), which already put every checked tensor
// on one device. The dispatcher picked CUDA because some tensor argument is on a GPU; this
// catches the rest (e.g. y on the CPU next to a CUDA `index`), with the CPU kernels' ValueError.
struct NamedTensor {
  const at::Tensor& t;
  const char* name;
};

inline void check_cuda_inputs(std::initializer_list<NamedTensor> ts) {
  for (const NamedTensor& n : ts)
    TORCH_CHECK_VALUE(!n.t.defined() || n.t.is_cuda(), "ppoison: ", n.name, " is on ", n.t.device(),
                      " but the op runs on CUDA (another argument is on a GPU); all tensors must be on the same "
                      "device");
}

// Value checks of several inputs with a single device sync, raising the CPU kernels'
// errors in the order given: Finite → report_nonfinite(name); FiniteNonneg → the
// h_sqnorm message ("ppoison: <name> must be finite and >= 0"). Undefined tensors pass.
enum class ValueCheck { Finite, FiniteNonneg };

struct NamedCheck {
  const at::Tensor& t;
  const char* name;
  ValueCheck kind;
};

inline void check_values(std::initializer_list<NamedCheck> checks) {
  std::vector<at::Tensor> flags;
  for (const NamedCheck& c : checks) {
    if (!c.t.defined() || c.t.numel() == 0) continue;
    at::Tensor ok = at::isfinite(c.t);
    if (c.kind == ValueCheck::FiniteNonneg) ok = at::logical_and(ok, c.t.ge(0));
    flags.push_back(ok.all());
  }
  if (flags.empty()) return;
  const at::Tensor host = at::stack(flags).cpu();  // the one sync
  const bool* ok = host.data_ptr<bool>();
  size_t i = 0;
  for (const NamedCheck& c : checks) {
    if (!c.t.defined() || c.t.numel() == 0) continue;
    const bool bad = !ok[i++];
    if (c.kind == ValueCheck::Finite) {
      report_nonfinite(bad, c.name);
    } else {
      TORCH_CHECK_VALUE(!bad, "ppoison: ", c.name, " must be finite and >= 0");
    }
  }
}

}  // namespace ppoison
