// Fused half-space projection over lists of tensors: the arithmetic shared by the CPU kernels
// (`_C`, stable ABI) and the CUDA kernels (`_C_cuda`, regular ABI). No torch types here.
//
//   x <- x - clamp((<a, x>·use_dot - b) / ||a||², 0, max_step) · a
//
// The op is split in a reduction entry (local partial sums) and an update entry (takes already
// reduced sums), so a caller can all-reduce in between under sharded training.
#pragma once

#include <type_traits>

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

// The step coefficient in float64, from the float32 sums (as returned) and b: the same rule as
// projection_coef, without its float32 overflow. With a tiny ||a||² (a = 1e-20 gives 1e-40, a
// float32 subnormal) the float32 ratio overflows to inf and the step used to be dropped though
// both sums are finite; here it is finite (clamped to [0, max_step]) and the update applies it.
// The coefficient returned to the caller is its float32 value (+inf past the float32 range).
SPARD_HOST_DEVICE inline double projection_coef64(double dot, double sqnorm, double b, double max_step,
                                                  bool use_dot) {
  const bool finite = (dot - dot == 0.0) && (sqnorm - sqnorm == 0.0) && (b - b == 0.0);
  if (!finite || !(sqnorm > 0.0)) return 0.0;
  double c = ((use_dot ? dot : 0.0) - b) / sqnorm;
  c = c > 0.0 ? c : 0.0;  // also maps NaN to 0
  c = c < max_step ? c : max_step;
  return (c - c == 0.0) ? c : 0.0;
}

}  // namespace spard
