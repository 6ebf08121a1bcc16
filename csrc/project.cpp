// Schemas of the projection ops and the input checks of their CPU kernels (stable ABI).
//
// The checks raise RuntimeError (std::runtime_error); the Python entry points (spard_ext/project.py)
// turn a refusal into the ValueError / TypeError of the check, with this message. The CUDA kernels
// check the same things with the same messages on the regular ABI (cuda/checks.cpp).
//
// The autograd side of the in-place ops (refuse writing a tensor that requires grad under grad
// mode; bump the version counters of the written tensors) has no stable C++ API: it is registered
// from Python (spard_ext/_autograd.py), as are the checks on inference tensors.
#include "project_cpu.h"

namespace spard {

namespace {
// at::has_internal_overlap's "Yes": a dimension of size > 1 with stride 0 (an expanded view).
bool has_internal_overlap(const Tensor& t) {
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (strides[d] == 0 && sizes[d] > 1) return true;
  }
  return false;
}
}  // namespace

void check_pair_lists(const std::vector<Tensor>& x, const std::vector<Tensor>& a, const char* op, bool writes_x,
                      std::vector<Meta>& x_meta, std::vector<Meta>& a_meta) {
  SPARD_CHECK(x.size() == a.size(), op, ": x and a must have the same length, got ", x.size(), " and ", a.size());
  x_meta.clear();
  a_meta.clear();
  if (x.empty()) return;
  x_meta.reserve(x.size());
  a_meta.reserve(a.size());
  const torch::stable::Device device = x[0].device();
  const bool on_cpu = device.is_cpu();
  // One call for a CPU tensor in a CPU list (the kernels' case), the full comparison otherwise.
  auto same_device = [&](const Tensor& t) { return (on_cpu && t.is_cpu()) || t.device() == device; };
  for (size_t i = 0; i < x.size(); ++i) {
    SPARD_CHECK(x[i].sizes() == a[i].sizes(), op, ": shape mismatch at index ", i, ": x[", i, "] has shape ",
                x[i].sizes(), " but a[", i, "] has shape ", a[i].sizes());
    const ScalarType xt = x[i].scalar_type(), at = a[i].scalar_type();
    SPARD_CHECK(is_floating(xt), op, ": x[", i, "] must be float32, float16, bfloat16 or float64, got ", xt);
    SPARD_CHECK(is_floating(at), op, ": a[", i, "] must be float32, float16, bfloat16 or float64, got ", at);
    SPARD_CHECK(same_device(x[i]), op, ": all tensors must be on one device: x[0] is on ", device, " but x[", i,
                "] is on ", x[i].device());
    SPARD_CHECK(same_device(a[i]), op, ": all tensors must be on one device: x[0] is on ", device, " but a[", i,
                "] is on ", a[i].device());
    const bool x_contiguous = x[i].is_contiguous();
    if (writes_x && !x_contiguous) {  // a contiguous tensor has distinct elements
      SPARD_CHECK(!has_internal_overlap(x[i]), op, ": x[", i,
                  "] has elements that share memory (an expanded or overlapping view), so it "
                  "cannot be updated in place; pass a tensor with distinct elements (e.g. .clone())");
    }
    x_meta.push_back({xt, x_contiguous});
    a_meta.push_back({at, a[i].is_contiguous()});
  }
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
