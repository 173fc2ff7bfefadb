// The part of PyTorch's stable ABI (torch/csrc/stable, TORCH_TARGET_VERSION in setup.py) the
// kernels use, and the few helpers ATen used to give them: argument errors, a float dispatch,
// outputs shaped like an input, calls of ATen ops through the dispatcher.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <array>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace ppoison {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<torch::stable::Tensor>;
using torch::headeronly::ScalarType;

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// "[4, 5]", as torch prints sizes.
inline std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// "cpu", "cuda:0", as torch prints devices.
inline std::string device_str(const Tensor& t) {
  const auto d = t.device();
  std::string name = d.type() == torch::headeronly::DeviceType::CPU    ? "cpu"
                     : d.type() == torch::headeronly::DeviceType::CUDA ? "cuda"
                     : d.type() == torch::headeronly::DeviceType::Meta ? "meta"
                                                                        : "device type " + std::to_string((int)d.type());
  return d.index() >= 0 ? name + ":" + std::to_string(d.index()) : name;
}

inline const char* dtype_str(ScalarType t) { return torch::headeronly::toString(t); }

// A C++ exception crosses the stable ABI as itself and reaches Python through pybind11, which
// maps std::invalid_argument to ValueError (a c10::ValueError/TypeError would need libc10's
// unstable symbols). The typed wrappers in ops.py raise TypeError for dtypes before calling.
#define PPOISON_CHECK(cond, ...)                                            \
  do {                                                                      \
    if (!(cond)) throw std::invalid_argument(::ppoison::str(__VA_ARGS__)); \
  } while (0)

#define PPOISON_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                   \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                          \
                      THO_DISPATCH_CASE(ScalarType::Double, __VA_ARGS__) \
                          THO_DISPATCH_CASE(ScalarType::Float, __VA_ARGS__))

inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// An uninitialised contiguous tensor of `sizes` on t's device, in t's dtype unless given. (The C
// shim's empty_strided directly: torch::stable::new_empty goes through the boxed dispatcher, which
// costs microseconds per output at batch 1.)
inline Tensor new_tensor(const Tensor& t, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                         std::optional<ScalarType> dtype = std::nullopt) {
  namespace sd = torch::stable::detail;
  const int64_t ndim = static_cast<int64_t>(sizes.size());
  STD_TORCH_CHECK(ndim <= 8, "ppoison: new_tensor takes at most 8 dimensions");
  std::array<int64_t, 8> strides{};
  for (int64_t d = ndim - 1, step = 1; d >= 0; step *= std::max<int64_t>(sizes[d], 1), --d) strides[d] = step;
  const auto device = t.device();
  AtenTensorHandle out = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      ndim, sizes.data(), strides.data(), sd::to<int32_t>(sd::from(dtype.value_or(t.scalar_type()))),
      sd::to<int32_t>(sd::from(device.type())), device.index(), &out));
  return Tensor(out);
}

// An ATen op through the dispatcher: args boxed in order, the first N returns out.
template <size_t N, typename... Args>
std::array<Tensor, N> call_aten(const char* name, const char* overload, const Args&... args) {
  constexpr size_t n = sizeof...(Args) > N ? sizeof...(Args) : N;
  std::array<StableIValue, n> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  std::array<Tensor, N> out;
  for (size_t i = 0; i < N; ++i) out[i] = torch::stable::detail::to<Tensor>(stack[i]);
  return out;
}

}  // namespace ppoison
