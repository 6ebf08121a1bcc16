// Fused half-space projection over lists of tensors (shared declarations).
//
//   x <- x - clamp((<a, x>·use_dot - b) / ||a||², 0, max_step) · a
//
// The op is split in a reduction entry (local partial sums) and an update entry (takes already
// reduced sums), so a caller can all-reduce in between under sharded training.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "message.h"

#ifdef __CUDACC__
#define SPARD_HOST_DEVICE __host__ __device__
#else
#define SPARD_HOST_DEVICE
#endif

namespace spard {

// Arithmetic type of the update (and of the CUDA per-vector partial sums): float for 16/32-bit
// inputs, double when either side is float64. The reductions themselves end in double.
template <typename tx, typename ta>
using acc_type = std::conditional_t<std::is_same_v<tx, double> || std::is_same_v<ta, double>, double, float>;

// Runs the body with `tx` and `ta` bound to the element types of the x and a tensors.
#define SPARD_DISPATCH_PAIR(TX, TA, NAME, ...)                                                    \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TX, NAME, [&] {                        \
    using tx = scalar_t;                                                                          \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TA, NAME, [&] {                      \
      using ta = scalar_t;                                                                        \
      __VA_ARGS__();                                                                              \
    });                                                                                           \
  })

// float32 value of a double sum; ±inf beyond the float32 range, so a sum that leaves the range
// is reported as inf and makes the call the documented no-op (projection_coef) on every backend.
SPARD_HOST_DEVICE inline float to_float(double v) {
  constexpr double kFloatMax = 3.4028234663852886e38;
  if (v > kFloatMax) return __builtin_huge_valf();
  if (v < -kFloatMax) return -__builtin_huge_valf();
  return static_cast<float>(v);  // NaN stays NaN
}

// Step coefficient of the projection. Returns 0 (no update) when any input is non-finite or the
// direction is zero, so a bad reduction never writes NaN into x.
SPARD_HOST_DEVICE inline float projection_coef(
    float dot, float sqnorm, float b, float max_step, bool use_dot) {
  const bool finite = (dot - dot == 0.f) && (sqnorm - sqnorm == 0.f) && (b - b == 0.f);
  if (!finite || !(sqnorm > 0.f)) return 0.f;
  float c = ((use_dot ? dot : 0.f) - b) / sqnorm;
  c = c > 0.f ? c : 0.f;  // also maps NaN to 0
  c = c < max_step ? c : max_step;
  return (c - c == 0.f) ? c : 0.f;
}

// Validates the two lists (same length, same shapes pairwise, floating dtypes, one device).
// With writes_x, also that every x[i] can be written in place (no element shares memory with
// another, not an inference tensor outside inference mode): all checks run before any write.
void check_pair_lists(at::TensorList x, at::TensorList a, const char* op, bool writes_x);
void check_scalar(const at::Tensor& t, const char* name, const char* op, const at::Device& device);
void check_max_step(double max_step, const char* op);

std::vector<at::Tensor> contiguous_list(at::TensorList ts);

// Writes a contiguous working copy back into a non-contiguous destination.
void copy_back(at::TensorList dst, const std::vector<at::Tensor>& work);

}  // namespace spard
