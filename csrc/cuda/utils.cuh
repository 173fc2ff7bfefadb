// Launch geometry, warp reductions and input checks shared by the CUDA kernels.
//   elementwise kernels: THREADS threads per block, BLOCKS(n) blocks, grid-stride loops;
//   row kernels:         a thread per row (the per-row math of csrc/*.h), BLOCKS(rows) blocks,
//                        grid-stride; jacobian's row_sum is a warp per row, WARP_BLOCKS(rows) blocks.
// Only included from csrc/cuda/*.cu (nvcc).
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "../utils.h"

namespace ppoison {

// The current CUDA stream of the guarded device (the stable ABI's C shim: torch 2.11 has no
// Stream::nativeHandle).
inline cudaStream_t current_stream(const torch::stable::accelerator::DeviceGuard&) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(torch::stable::accelerator::getCurrentDeviceIndex(), &stream));
  return static_cast<cudaStream_t>(stream);
}

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
  const Tensor& t;
  const char* name;
};

inline void check_cuda_inputs(std::initializer_list<NamedTensor> ts) {
  for (const NamedTensor& n : ts)
    PPOISON_CHECK(!n.t.defined() || n.t.is_cuda(), "ppoison: ", n.name, " is on ", device_str(n.t),
                      " but the op runs on CUDA (another argument is on a GPU); all tensors must be on the same "
                      "device");
}

}  // namespace ppoison
