// Input checks of the CUDA kernels (`_C_cuda`), on the regular ATen ABI with typed errors
// (ValueError / TypeError). The CPU kernels (`_C`, stable ABI) check the same things with the
// same messages in ../project.cpp and ../dpp_greedy.cpp.
#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>

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

// ------------------------------------------------------------------------------------------------
// Greedy DPP (none of these reads a device value on the host)
// ------------------------------------------------------------------------------------------------
namespace {

void check_float_matrix(const at::Tensor& t, const char* name, const char* op) {
  SPARD_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be a 2-D tensor, got shape ", t.sizes());
  SPARD_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
                   " must be float32 or float64, got ", t.scalar_type());
}

// [all finite, max |L - Lᵀ|, max |L|] of the input as float64 0-d tensors on its device, with no
// N x N (or N x D) temporary: aminmax propagates NaN and shows ±inf, and the symmetry is checked
// a block of rows at a time.
std::vector<at::Tensor> data_checks(const at::Tensor& t, bool dense) {
  const auto opts = t.options().dtype(at::kDouble);
  if (t.numel() == 0) return {at::ones({}, opts), at::zeros({}, opts), at::zeros({}, opts)};
  const auto [lo, hi] = at::aminmax(t);
  const at::Tensor finite = at::logical_and(at::isfinite(lo), at::isfinite(hi)).to(at::kDouble);
  const at::Tensor scale = at::maximum(lo.abs(), hi.abs()).to(at::kDouble);
  if (!dense) return {finite, at::zeros({}, opts), scale};
  const int64_t n = t.size(0);
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(n, 1));
  std::vector<at::Tensor> parts;
  for (int64_t r = 0; r < n; r += rows) {
    const int64_t len = std::min(rows, n - r);
    parts.push_back((t.narrow(0, r, len) - t.narrow(1, r, len).transpose(0, 1)).abs().amax());
  }
  return {finite, at::stack(parts).amax().to(at::kDouble), scale};
}

at::Tensor mask_or_zeros(const std::optional<at::Tensor>& m, const char* name, int64_t n,
                         const at::Tensor& like, const char* op) {
  if (!m.has_value()) return at::zeros({n}, like.options().dtype(at::kByte));
  const at::Tensor& t = *m;
  SPARD_CHECK_TYPE(t.scalar_type() == at::kBool, op, ": ", name, " must be a bool mask, got ",
                   t.scalar_type());
  SPARD_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name,
                    " must be a 1-D mask of length N = ", n, ", got shape ", t.sizes());
  SPARD_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on ", like.device(),
                    " like the kernel, got ", t.device());
  return t.to(at::kByte).contiguous();
}

DppInputs check_common(const at::Tensor& mat, bool dense, int64_t k, double eps_stop,
                       const std::optional<at::Tensor>& include,
                       const std::optional<at::Tensor>& exclude, const char* op) {
  SPARD_CHECK_VALUE(k >= 0, op, ": k must be >= 0, got ", k);
  SPARD_CHECK_VALUE(!std::isnan(eps_stop), op, ": eps_stop must not be NaN");
  DppInputs in;
  in.op = op;
  in.name = dense ? "kernel" : "factor";
  in.dense = dense;
  in.float32 = mat.scalar_type() == at::kFloat;
  in.n = mat.size(0);
  in.k = std::min<int64_t>(k, in.n);
  in.include = mask_or_zeros(include, "include", in.n, mat, op);
  in.exclude = mask_or_zeros(exclude, "exclude", in.n, mat, op);
  std::vector<at::Tensor> checks = data_checks(mat, dense);
  checks.push_back(at::logical_and(in.include, in.exclude).any().to(at::kDouble));
  in.deferred = at::stack(checks);
  return in;
}

}  // namespace

void check_deferred(const DppInputs& in, const double* v) {
  SPARD_CHECK_VALUE(v[0] == 1.0, in.op, ": ", in.name, " must be finite (it holds NaN or Inf)");
  if (in.dense) {
    // Symmetric up to rounding: a kernel built as F·Fᵀ in float32 passes, a wrong matrix does not.
    const double tol = (in.float32 ? 1e-5 : 1e-10) * std::max(v[2], 1e-30);
    SPARD_CHECK_VALUE(v[1] <= tol, in.op, ": kernel must be symmetric, max |L - Lᵀ| = ", v[1], " (tolerance ", tol,
                      ")");
  }
  SPARD_CHECK_VALUE(v[3] == 0.0, in.op, ": include and exclude must not share an item");
}

DppInputs check_dpp_dense(const at::Tensor& kernel, int64_t k, double eps_stop,
                          const std::optional<at::Tensor>& include,
                          const std::optional<at::Tensor>& exclude) {
  const char* op = "dpp_greedy_dense";
  check_float_matrix(kernel, "kernel", op);
  SPARD_CHECK_VALUE(kernel.size(0) == kernel.size(1), op, ": kernel must be square (N x N), got shape ",
                    kernel.sizes());
  return check_common(kernel, true, k, eps_stop, include, exclude, op);
}

DppInputs check_dpp_lowrank(const at::Tensor& factor, int64_t k, double eps, double eps_stop,
                            const std::optional<at::Tensor>& include,
                            const std::optional<at::Tensor>& exclude, const std::string& method,
                            DppMethod& resolved) {
  const char* op = "dpp_greedy_lowrank";
  check_float_matrix(factor, "factor", op);
  SPARD_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  SPARD_CHECK_VALUE(method == "auto" || method == "cholesky" || method == "inverse", op,
                    ": method must be 'auto', 'cholesky' or 'inverse', got '", method, "'");
  SPARD_CHECK_VALUE(!(method == "inverse" && eps == 0), op,
                    ": method 'inverse' needs eps > 0 (it starts from A = I / eps)");
  DppInputs in = check_common(factor, false, k, eps_stop, include, exclude, op);
  resolved = resolve_dpp_method(method, eps, in.n, factor.size(1), in.k);
  return in;
}

}  // namespace spard
