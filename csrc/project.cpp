// Schemas of the projection ops and the input checks of their CPU kernels (stable ABI).
//
// The checks raise RuntimeError (std::runtime_error); the Python entry points (spard_ext/project.py)
// turn a refusal into the ValueError / TypeError of the check, with this message. The CUDA kernels
// check the same things with the same messages (cuda/checks.cpp; the overlap check is shared: overlap.h).
//
// The autograd side of the in-place ops (refuse writing a tensor that requires grad under grad
// mode; bump the version counters of the written tensors) has no stable C++ API: it is registered
// from Python (spard_ext/_autograd.py), as are the checks on inference tensors.
#include <algorithm>
#include <cstdint>

#include "project_cpu.h"
#include "overlap.h"

namespace spard {

using overlap::check_no_shared_memory;
using overlap::Span;
using overlap::writable_span;

void check_pair_lists(const std::vector<Tensor>& x, const std::vector<Tensor>& a, const char* op, bool writes_x,
                      std::vector<Meta>& x_meta, std::vector<Meta>& a_meta) {
  SPARD_CHECK(x.size() == a.size(), op, ": x and a must have the same length, got ", x.size(), " and ", a.size());
  x_meta.clear();
  a_meta.clear();
  if (x.empty()) return;
  x_meta.reserve(x.size());
  a_meta.reserve(a.size());
  std::vector<Span> spans;
  if (writes_x) spans.reserve(x.size());
  const torch::stable::Device device = x[0].device();
  const bool on_cpu = device.is_cpu();
  // One call for a CPU tensor in a CPU list (the kernels' case), the full comparison otherwise.
  auto same_device = [&](const Tensor& t) { return (on_cpu && t.is_cpu()) || t.device() == device; };
  for (size_t i = 0; i < x.size(); ++i) {
    const auto x_sizes = x[i].sizes();
    SPARD_CHECK(x_sizes == a[i].sizes(), op, ": shape mismatch at index ", i, ": x[", i, "] has shape ",
                x_sizes, " but a[", i, "] has shape ", a[i].sizes());
    const ScalarType xt = x[i].scalar_type(), at = a[i].scalar_type();
    SPARD_CHECK(is_floating(xt), op, ": x[", i, "] must be float32, float16, bfloat16 or float64, got ", xt);
    SPARD_CHECK(is_floating(at), op, ": a[", i, "] must be float32, float16, bfloat16 or float64, got ", at);
    SPARD_CHECK(same_device(x[i]), op, ": all tensors must be on one device: x[0] is on ", device, " but x[", i,
                "] is on ", x[i].device());
    SPARD_CHECK(same_device(a[i]), op, ": all tensors must be on one device: x[0] is on ", device, " but a[", i,
                "] is on ", a[i].device());
    int64_t numel = 1;
    for (const int64_t s : x_sizes) numel *= s;
    const bool x_contiguous = x[i].is_contiguous();
    void* x_data = nullptr;
    if (writes_x && numel > 0) {
      x_data = x[i].mutable_data_ptr();
      spans.push_back(writable_span(x[i], i, xt, numel, x_contiguous, x_data, op));
    } else {
      x_data = writes_x ? nullptr : const_cast<void*>(x[i].const_data_ptr());
    }
    x_meta.push_back({xt, x_contiguous, numel, x_data});
    a_meta.push_back({at, a[i].is_contiguous(), numel, const_cast<void*>(a[i].const_data_ptr())});
  }
  if (writes_x) check_no_shared_memory(spans, op);
}

void check_scalar(const Tensor& t, const char* name, const char* op) {
  SPARD_CHECK(t.numel() == 1, op, ": ", name, " must be a scalar (one element), got shape ", t.sizes());
  SPARD_CHECK(is_floating(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
  SPARD_CHECK(t.is_cpu(), op, ": ", name, " must be on cpu (or a CPU scalar), got ", t.device());
}

void check_max_step(double max_step, const char* op) {
  SPARD_CHECK(max_step >= 0, op, ": max_step must be >= 0 (use inf for no cap), got ", max_step);
}

}  // namespace spard

STABLE_TORCH_LIBRARY_FRAGMENT(spard_ext, m) {
  m.def("project_reduce(Tensor[] x, Tensor[] a, bool use_dot) -> (Tensor dot, Tensor sqnorm)");
  m.def(
      "project_apply_(Tensor(a!)[] x, Tensor[] a, Tensor dot, Tensor sqnorm, Tensor b, "
      "float max_step, bool use_dot) -> Tensor coef");
  m.def(
      "project_(Tensor(a!)[] x, Tensor[] a, Tensor b, float max_step, bool use_dot) "
      "-> (Tensor coef, Tensor dot, Tensor sqnorm)");
}
