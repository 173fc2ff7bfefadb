// Launch geometry, warp reductions and input checks shared by the CUDA kernels.
//   elementwise kernels: THREADS threads per block, BLOCKS(n) blocks, grid-stride loops;
//   row kernels:         a thread per row (the per-row math of csrc/*.h; grad2_allocate: a thread
//                        per (row, budget)), grid-stride, shaped by row_launch: blocks of 32 up to
//                        the kernel's maximum (THREADS; mad_oracle 64, modelguard_w_solve 128)
//                        threads, the fewest that keep the block count within the device's SM
//                        count, so that a small batch is spread over the SMs (e.g. 1,000 rows on
//                        132 SMs: 32 blocks of 32, not 4 blocks of 256) and a large one gets
//                        the full blocks it always had;
//   jacobian's row_sum:  a warp per row, WARP_BLOCKS(rows) blocks of THREADS.
// No row kernel is a warp per row for large K: their per-row math (csrc/*.h, the code the CPU
// tests check) runs sequential sums; a warp could split them only by rounding in another order
// (grad2_allocate: no longer the CPU's bits), or keep the order and merely prefetch for one lane.
// Only included from csrc/cuda/*.cu (nvcc).
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <atomic>
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

// The multiprocessor count of the guarded (current) device, asked of the runtime once per device.
inline int sm_count(const torch::stable::accelerator::DeviceGuard&) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // 0: not asked yet
  const int dev = (int)torch::stable::accelerator::getCurrentDeviceIndex();
  int n = dev >= 0 && dev < kMaxDevices ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (n > 0) return n;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  n = std::max(n, 1);
  if (dev >= 0 && dev < kMaxDevices) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

// Threads a block for a thread-per-row kernel over `rows` rows on `sms` SMs: ⌈rows / SMs⌉ rounded
// up to a warp, within [32, max_threads]. Blocks: BLOCKS(rows, threads), at most the SM count
// until every block is full.
constexpr int row_threads(int64_t rows, int64_t sms, int max_threads) {
  const int64_t per_sm = (std::max<int64_t>(rows, 1) + sms - 1) / sms;
  const int64_t warps = (per_sm + WARP_SIZE - 1) / WARP_SIZE;
  return (int)std::clamp<int64_t>(warps * WARP_SIZE, WARP_SIZE, max_threads);
}
// 132 SMs (H100 SXM, H200): one row; 1,000 rows in 32 blocks of 32; 10,000 in 105 of 96; full
// blocks from 256·132 rows; a kernel's own maximum (the oracle's 64).
static_assert(row_threads(1, 132, THREADS) == 32 && row_threads(1000, 132, THREADS) == 32);
static_assert(row_threads(10000, 132, THREADS) == 96 && row_threads(256 * 132, 132, THREADS) == 256);
static_assert(row_threads(256 * 132 + 1, 132, THREADS) == 256 && row_threads(1 << 20, 132, 64) == 64);

struct RowLaunch {
  unsigned int blocks;
  int threads;
};

// The launch of a thread-per-row kernel over `rows` rows of the guarded device. Grid-stride loops,
// as every kernel: past the grid cap a thread takes more rows.
inline RowLaunch row_launch(const torch::stable::accelerator::DeviceGuard& guard, int64_t rows,
                            int max_threads = THREADS) {
  const int threads = row_threads(rows, sm_count(guard), max_threads);
  return {BLOCKS(rows, threads), threads};
}

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
