// Sums with a fixed number of independent accumulators, shared by the CPU kernels.
#pragma once

#include <torch/headeronly/macros/Macros.h>

#include <cstdint>

// Multi-versioned CPU functions: compiled for x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and a
// baseline, picked at load time. A lane_sum inlined into such a function vectorises for each.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SPARD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPARD_CLONES
#endif

namespace spard {

constexpr int kSumLanes = 16;

// Σ term(i) over [0, n): element i goes to lane i mod kSumLanes (so the loop vectorises), then
// the lanes are added in order in double. The order of additions is fixed, so the result does not
// depend on the thread count or the SIMD width. Always inlined, so it is compiled for the target
// of its caller (the multi-versioned functions above).
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
