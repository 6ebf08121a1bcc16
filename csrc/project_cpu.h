// Input checks of the CPU projection kernels (project.cpp), on stable tensors.
#pragma once

#include <vector>

#include "project.h"
#include "stable.h"

namespace spard {

// What the kernels need of each tensor, read once: every query of a stable tensor is a call into
// torch's C shim, and a list of a few hundred small tensors makes them the cost of a call.
struct Meta {
  ScalarType dtype;
  bool contiguous;
  int64_t numel;
  void* data;  // mutable for a list that is written (it materialises a lazily cloned tensor)
};

// Validates the two lists (same length, same shapes pairwise, floating dtypes, one device).
// With writes_x, also that no element of x shares memory with another, within an entry or
// across entries (the same tensor twice, overlapping views): all checks run before any write.
// Fills the dtype, contiguity, size and data of each tensor.
void check_pair_lists(const std::vector<Tensor>& x, const std::vector<Tensor>& a, const char* op, bool writes_x,
                      std::vector<Meta>& x_meta, std::vector<Meta>& a_meta);
// A one-element floating-point CPU tensor.
void check_scalar(const Tensor& t, const char* name, const char* op);
void check_max_step(double max_step, const char* op);

}  // namespace spard
