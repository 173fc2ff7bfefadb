// MAD perturbation-direction search (CUDA launcher of oracle.h, as mad_oracle_cpu.cpp):
// per sample the target vertex y* [B, K] and its objective value [B].
// One thread per sample row b (row_launch, at most ORACLE_THREADS a block), running oracle_row_fc
// / oracle_row_dense. Its per-row scratch is row b of [B, K] tensors allocated here: the vertex
// mask (uint8, argmax), the greedy's added-class order (int32) and smoothed y (scalar_t), the
// dense Gram's M·y and, for the greedy search, M·1_S (double). The exact search keeps its
// kLowBits tables in local memory.

#include "../oracle.h"
#include "../ops.h"
#include "../utils.h"
#include "utils.cuh"

namespace ppoison {

namespace {

constexpr int ORACLE_THREADS = 64;  // the most a block: long-running threads, spread over more SMs

// Row b of the [B, K] scratch tensors (nullptr where not allocated).
template <typename scalar_t>
struct ScratchRows {
  unsigned char* mask;
  int* order;
  scalar_t* ysmooth;
  double* my;
  double* r;

  __device__ OracleScratch<scalar_t> row(int64_t b, int K) const {
    const int64_t o = b * K;
    return {mask ? mask + o : nullptr, order ? order + o : nullptr, ysmooth ? ysmooth + o : nullptr,
            my ? my + o : nullptr, r ? r + o : nullptr};
  }
};

// FC / identity Gram: p (nullptr: identity) and ‖h‖² (nullptr: 1).
template <typename scalar_t>
__global__ void oracle_fc_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ p,
                                 const scalar_t* __restrict__ hsq, const int64_t* __restrict__ index,
                                 OracleArgs a, int64_t B, int K, ScratchRows<scalar_t> s,
                                 scalar_t* __restrict__ ystar, scalar_t* __restrict__ value) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride()) {
    oracle_row_fc(y + b * K, p ? p + b * K : nullptr, hsq ? (double)hsq[b] : 1.0, index ? index[b] : 0, K, a,
                  s.row(b, K), ystar + b * K, value + b);
  }
}

// Dense Gram M [B, K, K].
template <typename scalar_t>
__global__ void oracle_dense_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ M,
                                    const int64_t* __restrict__ index, OracleArgs a, int64_t B, int K,
                                    ScratchRows<scalar_t> s, scalar_t* __restrict__ ystar,
                                    scalar_t* __restrict__ value) {
  for (int64_t b = thread_id0(); b < B; b += thread_stride()) {
    oracle_row_dense(y + b * K, M + b * (int64_t)K * K, index ? index[b] : 0, K, a, s.row(b, K), ystar + b * K,
                     value + b);
  }
}

template <typename T>
T* data_or_null(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

}  // namespace

std::tuple<Tensor, Tensor> mad_oracle_cuda(const Tensor& y_, const OptTensor& p_,
                                                   const OptTensor& hsq_,
                                                   const OptTensor& gram_, std::string_view oracle_s,
                                                   bool objmax, int64_t exact_max_k, int64_t max_candidates,
                                                   const OptTensor& index_) {
  const OracleInputs in = check_oracle_args(y_, p_, hsq_, gram_, oracle_s, exact_max_k, max_candidates, index_);
  const GramArgs& ga = in.gram;
  const Tensor& y = in.y;
  check_cuda_inputs({{y, "y"}, {ga.p, "p"}, {ga.hsq, "h_sqnorm"}, {ga.gram, "gram"}, {in.index, "index"}});
  const torch::stable::accelerator::DeviceGuard guard(y.get_device_index());
  const int64_t B = y.size(0), K = y.size(1);
  auto ystar = new_tensor(y, {B, K});
  auto value = new_tensor(y, {B});
  if (B == 0) return {ystar, value};
  // The CPU kernel skips and reports rows in this order: y, then p, gram, h_sqnorm.
  check_values({{y, "y", ValueCheck::Finite},
                {ga.p, "p", ValueCheck::Finite},
                {ga.gram, "gram", ValueCheck::Finite},
                {ga.hsq, "h_sqnorm", ValueCheck::FiniteNonneg}});

  const bool argmax = in.oracle == Oracle::Argmax;
  const OracleArgs args{in.oracle, objmax, argmax && K > exact_max_k, max_candidates};
  Tensor mask = argmax ? new_tensor(y, {B, K}, ScalarType::Byte) : Tensor();
  Tensor order = args.greedy ? new_tensor(y, {B, K}, ScalarType::Int) : Tensor();
  Tensor ysmooth = args.greedy ? new_tensor(y, {B, K}) : Tensor();
  Tensor my = ga.dense ? new_tensor(y, {B, K}, ScalarType::Double) : Tensor();
  Tensor r = ga.dense && args.greedy ? new_tensor(y, {B, K}, ScalarType::Double) : Tensor();
  const int64_t* index_p = data_or_null<int64_t>(in.index);

  const cudaStream_t stream = current_stream(guard);
  const RowLaunch launch = row_launch(guard, B, ORACLE_THREADS);
  PPOISON_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mad_oracle_cuda", [&] {
    const ScratchRows<scalar_t> s{data_or_null<unsigned char>(mask), data_or_null<int>(order),
                                  data_or_null<scalar_t>(ysmooth), data_or_null<double>(my),
                                  data_or_null<double>(r)};
    if (ga.dense) {
      oracle_dense_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(
          y.mutable_data_ptr<scalar_t>(), ga.gram.mutable_data_ptr<scalar_t>(), index_p, args, B, (int)K, s,
          ystar.mutable_data_ptr<scalar_t>(), value.mutable_data_ptr<scalar_t>());
    } else {
      oracle_fc_kernel<scalar_t><<<launch.blocks, launch.threads, 0, stream>>>(
          y.mutable_data_ptr<scalar_t>(), data_or_null<scalar_t>(ga.p), data_or_null<scalar_t>(ga.hsq), index_p, args, B,
          (int)K, s, ystar.mutable_data_ptr<scalar_t>(), value.mutable_data_ptr<scalar_t>());
    }
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ystar, value};
}

STABLE_TORCH_LIBRARY_IMPL(ppoison, CUDA, m) { m.impl("mad_oracle", TORCH_BOX(&mad_oracle_cuda)); }

}  // namespace ppoison
