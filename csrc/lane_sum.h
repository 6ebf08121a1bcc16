// Sums with a fixed number of independent accumulators, shared by the CPU kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace spard {

constexpr int kSumLanes = 16;

// Σ term(i) over [0, n): element i goes to lane i mod kSumLanes (so the loop vectorises), then
// the lanes are added in order in double. The order of additions is fixed, so the result does not
// depend on the thread count or the SIMD width. Always inlined, so it is compiled for the target
// of its caller (the multi-versioned dot products of dpp_greedy).
template <typename acc, typename Term>
C10_ALWAYS_INLINE double lane_sum(int64_t n, Term term) {
  acc lanes[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) lanes[j] += term(i + j);
  }
  for (int j = 0; i < n; ++i, ++j) lanes[j] += term(i);
  double total = 0;
  for (int j = 0; j < kSumLanes; ++j) total += lanes[j];
  return total;
}

}  // namespace spard
