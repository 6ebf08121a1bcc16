// Schemas of the projection ops and the input checks shared by the CPU and CUDA backends.
#include "project.h"

#include <torch/library.h>

namespace spard {

static bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_pair_lists(at::TensorList x, at::TensorList a, const char* op) {
  TORCH_CHECK_VALUE(x.size() == a.size(), op, ": x and a must have the same length, got ",
                    x.size(), " and ", a.size());
  if (x.empty()) return;
  const at::Device device = x[0].device();
  for (size_t i = 0; i < x.size(); ++i) {
    TORCH_CHECK_VALUE(x[i].sizes() == a[i].sizes(), op, ": shape mismatch at index ", i, ": x[",
                      i, "] has shape ", x[i].sizes(), " but a[", i, "] has shape ", a[i].sizes());
    TORCH_CHECK_TYPE(is_supported_float(x[i].scalar_type()), op, ": x[", i,
                     "] must be float32, float16, bfloat16 or float64, got ", x[i].scalar_type());
    TORCH_CHECK_TYPE(is_supported_float(a[i].scalar_type()), op, ": a[", i,
                     "] must be float32, float16, bfloat16 or float64, got ", a[i].scalar_type());
    TORCH_CHECK_VALUE(x[i].device() == device, op, ": all tensors must be on one device: x[0] is on ",
                      device, " but x[", i, "] is on ", x[i].device());
    TORCH_CHECK_VALUE(a[i].device() == device, op, ": all tensors must be on one device: x[0] is on ",
                      device, " but a[", i, "] is on ", a[i].device());
  }
}

void check_scalar(const at::Tensor& t, const char* name, const char* op, const at::Device& device) {
  TORCH_CHECK_VALUE(t.numel() == 1, op, ": ", name, " must be a scalar (one element), got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device || t.device().is_cpu(), op, ": ", name,
                    " must be on ", device, " (or a CPU scalar), got ", t.device());
}

void check_max_step(double max_step, const char* op) {
  TORCH_CHECK_VALUE(max_step >= 0, op, ": max_step must be >= 0 (use inf for no cap), got ",
                    max_step);
}

std::vector<at::Tensor> contiguous_list(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

void copy_back(at::TensorList dst, const std::vector<at::Tensor>& work) {
  for (size_t i = 0; i < dst.size(); ++i) {
    if (!dst[i].is_same(work[i])) dst[i].copy_(work[i]);
  }
}

}  // namespace spard

TORCH_LIBRARY_FRAGMENT(spard_ext, m) {
  m.def("project_reduce(Tensor[] x, Tensor[] a, bool use_dot) -> (Tensor dot, Tensor sqnorm)");
  m.def(
      "project_apply_(Tensor(a!)[] x, Tensor[] a, Tensor dot, Tensor sqnorm, Tensor b, "
      "float max_step, bool use_dot) -> Tensor coef");
  m.def(
      "project_(Tensor(a!)[] x, Tensor[] a, Tensor b, float max_step, bool use_dot) "
      "-> (Tensor coef, Tensor dot, Tensor sqnorm)");
}
