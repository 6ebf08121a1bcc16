// What the CPU kernels (`_C`) use of the LibTorch stable ABI: compiled with TORCH_TARGET_VERSION
// (setup.py, CMakeLists.txt), the library calls torch only through its C shim, so one build loads
// under every torch release from the target on.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <vector>

#include "message.h"

#ifndef TORCH_TARGET_VERSION
#error "the CPU kernels are built on the stable ABI: compile with -DTORCH_TARGET_VERSION=..."
#endif

namespace spard {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// t itself when contiguous (no call through the dispatcher), else a contiguous copy.
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Double;
}

// Calls f(T{}) with T the element type of a float32 / float64 / float16 / bfloat16 tensor.
template <typename F>
void dispatch_float(ScalarType t, const char* name, const F& f) {
  switch (t) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Double: f(double{}); break;
    case ScalarType::Half: f(torch::headeronly::Half{}); break;
    case ScalarType::BFloat16: f(torch::headeronly::BFloat16{}); break;
    default: SPARD_CHECK(false, name, ": unsupported dtype ", t);
  }
}

// Runs the body with `tx` and `ta` bound to the element types of the x and a tensors.
#define SPARD_DISPATCH_PAIR(TX, TA, NAME, ...)                    \
  ::spard::dispatch_float(TX, NAME, [&](auto spard_tx_tag_) {     \
    using tx = decltype(spard_tx_tag_);                           \
    ::spard::dispatch_float(TA, NAME, [&](auto spard_ta_tag_) {   \
      using ta = decltype(spard_ta_tag_);                         \
      __VA_ARGS__();                                              \
    });                                                           \
  })

}  // namespace spard
