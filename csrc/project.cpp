// Schemas of the projection ops, the input checks shared by the CPU and CUDA backends, and the
// autograd side of the in-place ops (Autograd and ADInplaceOrView kernels).
#include "project.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

namespace spard {

static bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_pair_lists(at::TensorList x, at::TensorList a, const char* op, bool writes_x) {
  SPARD_CHECK_VALUE(x.size() == a.size(), op, ": x and a must have the same length, got ",
                    x.size(), " and ", a.size());
  if (x.empty()) return;
  const at::Device device = x[0].device();
  for (size_t i = 0; i < x.size(); ++i) {
    SPARD_CHECK_VALUE(x[i].sizes() == a[i].sizes(), op, ": shape mismatch at index ", i, ": x[",
                      i, "] has shape ", x[i].sizes(), " but a[", i, "] has shape ", a[i].sizes());
    SPARD_CHECK_TYPE(is_supported_float(x[i].scalar_type()), op, ": x[", i,
                     "] must be float32, float16, bfloat16 or float64, got ", x[i].scalar_type());
    SPARD_CHECK_TYPE(is_supported_float(a[i].scalar_type()), op, ": a[", i,
                     "] must be float32, float16, bfloat16 or float64, got ", a[i].scalar_type());
    SPARD_CHECK_VALUE(x[i].device() == device, op, ": all tensors must be on one device: x[0] is on ",
                      device, " but x[", i, "] is on ", x[i].device());
    SPARD_CHECK_VALUE(a[i].device() == device, op, ": all tensors must be on one device: x[0] is on ",
                      device, " but a[", i, "] is on ", a[i].device());
    if (writes_x) {
      SPARD_CHECK_VALUE(at::has_internal_overlap(x[i]) != at::MemOverlap::Yes, op, ": x[", i,
                        "] has elements that share memory (an expanded or overlapping view), so it "
                        "cannot be updated in place; pass a tensor with distinct elements (e.g. .clone())");
      SPARD_CHECK(!x[i].is_inference() || c10::InferenceMode::is_enabled(), op, ": x[", i,
                  "] is an inference tensor: update it inside torch.inference_mode(), or pass a clone");
    }
  }
}

void check_scalar(const at::Tensor& t, const char* name, const char* op, const at::Device& device) {
  SPARD_CHECK_VALUE(t.numel() == 1, op, ": ", name, " must be a scalar (one element), got shape ",
                    t.sizes());
  SPARD_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  SPARD_CHECK_VALUE(t.device() == device || t.device().is_cpu(), op, ": ", name,
                    " must be on ", device, " (or a CPU scalar), got ", t.device());
}

void check_max_step(double max_step, const char* op) {
  SPARD_CHECK_VALUE(max_step >= 0, op, ": max_step must be >= 0 (use inf for no cap), got ",
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

namespace {

// Tensors of the Tensor(a!) arguments of a call on the stack (single tensors and lists).
std::vector<at::Tensor> written_tensors(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::AliasInfo* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& v = stack[first + i];
    if (v.isTensor()) {
      out.push_back(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorVector()) out.push_back(t);
    }
  }
  return out;
}

// Autograd: the ops have no derivative. Under grad mode, refuse to write a tensor that requires
// grad, as a native in-place op refuses a leaf (the Python entry points run under no_grad, as
// optimizers do). Then on to ADInplaceOrView.
void autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& t : written_tensors(op, *stack)) {
      SPARD_CHECK(!(t.requires_grad() && t.is_leaf()), op.schema().name(),
                  ": a leaf Variable that requires grad is being used in an in-place operation "
                  "(call it under torch.no_grad(), as the spard_ext entry points do)");
      SPARD_CHECK(!t.requires_grad(), op.schema().name(),
                  ": has no derivative and writes a tensor that requires grad; call it under torch.no_grad()");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView: after the kernel ran, bump the version counter of every written tensor (a
// view shares its base's counter), as native in-place ops do, so a backward that saved one of
// them before the call raises instead of silently using the new values.
void inplace_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const std::vector<at::Tensor> written = written_tensors(op, *stack);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
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

TORCH_LIBRARY_IMPL(spard_ext, Autograd, m) {
  m.impl("project_apply_", torch::CppFunction::makeFromBoxedFunction<&spard::autograd_kernel>());
  m.impl("project_", torch::CppFunction::makeFromBoxedFunction<&spard::autograd_kernel>());
}

TORCH_LIBRARY_IMPL(spard_ext, ADInplaceOrView, m) {
  m.impl("project_apply_", torch::CppFunction::makeFromBoxedFunction<&spard::inplace_kernel>());
  m.impl("project_", torch::CppFunction::makeFromBoxedFunction<&spard::inplace_kernel>());
}
