// Memory-overlap checks of the in-place projection ops, shared by the CPU library (project.cpp)
// and the CUDA library (cuda/checks.cpp): header-only, on the stable ABI's header-only types.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "message.h"
#include "stable.h"

namespace spard {
namespace overlap {

// at::has_internal_overlap's "Yes": a dimension of size > 1 with stride 0 (an expanded view).
inline bool has_internal_overlap(torch::headeronly::IntHeaderOnlyArrayRef sizes,
                                 torch::headeronly::IntHeaderOnlyArrayRef strides) {
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (strides[d] == 0 && sizes[d] > 1) return true;
  }
  return false;
}

inline size_t element_size(ScalarType t) { return t == ScalarType::Double ? 8 : t == ScalarType::Float ? 4 : 2; }

// Bytes [begin, end) an entry of x spans.
struct Span {
  uintptr_t begin, end;
  size_t index;
};

// The bytes x[i] spans from ``data`` (its mutable pointer; numel > 0): for a tensor that is not
// contiguous, from its first to one past its last element, after refusing one whose own elements
// share memory (an expanded view). The caller passes what it has already read of the tensor.
inline Span writable_span(const Tensor& t, size_t i, ScalarType dtype, int64_t numel, bool contiguous, void* data,
                          const char* op) {
  int64_t extent = numel;  // a contiguous tensor has distinct elements
  if (!contiguous) {
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    SPARD_CHECK(!has_internal_overlap(sizes, strides), op, ": x[", i,
                "] has elements that share memory (an expanded or overlapping view), so it "
                "cannot be updated in place; pass a tensor with distinct elements (e.g. .clone())");
    extent = 1;
    for (size_t d = 0; d < sizes.size(); ++d) extent += (sizes[d] - 1) * strides[d];
  }
  const auto begin = reinterpret_cast<uintptr_t>(data);
  return {begin, begin + static_cast<uintptr_t>(extent) * element_size(dtype), i};
}

// Refuses two entries of x whose memory ranges meet, as native in-place foreach ops refuse
// overlapping outputs: updated one after the other, they would read each other's half-written
// values (the same tensor twice would take the step twice, torn across chunks or blocks). Views
// of one buffer that do not meet (the parameters of a flat buffer) pass. O(n log n) on the spans.
inline void check_no_shared_memory(std::vector<Span>& spans, const char* op) {
  if (spans.size() < 2) return;
  std::sort(spans.begin(), spans.end(), [](const Span& p, const Span& q) { return p.begin < q.begin; });
  size_t reach = 0;  // the span that reaches furthest so far
  for (size_t s = 1; s < spans.size(); ++s) {
    if (spans[s].begin < spans[reach].end) {
      const size_t i = std::min(spans[reach].index, spans[s].index), j = std::max(spans[reach].index, spans[s].index);
      SPARD_CHECK(false, op, ": x[", i, "] and x[", j, "] share memory (the same tensor twice, or overlapping ",
                  "views), so they cannot be updated in place; pass each tensor once");
    }
    if (spans[s].end > spans[reach].end) reach = s;
  }
}

}  // namespace overlap
}  // namespace spard
