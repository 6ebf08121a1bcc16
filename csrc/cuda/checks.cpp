// Host-side input checks of the CUDA kernels (`_C_cuda`, stable ABI): the messages of the CPU
// kernels (../project.cpp, ../dpp_greedy.cpp), raised as RuntimeError; none reads device memory,
// so they run, and refuse, before anything is launched (also without a GPU, on CPU tensors
// redispatched to the CUDA kernels: the CI's ABI gate does so, .ci/abi_gate).
#include "checks.h"
#include "../overlap.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace spard {

using overlap::check_no_shared_memory;
using overlap::Span;
using overlap::writable_span;

void check_pair_lists(const std::vector<Tensor>& x, const std::vector<Tensor>& a, const char* op, bool writes_x) {
  SPARD_CHECK(x.size() == a.size(), op, ": x and a must have the same length, got ", x.size(), " and ", a.size());
  if (x.empty()) return;
  const Device device = x[0].device();
  std::vector<Span> spans;
  if (writes_x) spans.reserve(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const auto x_sizes = x[i].sizes();
    SPARD_CHECK(x_sizes == a[i].sizes(), op, ": shape mismatch at index ", i, ": x[", i, "] has shape ", x_sizes,
                " but a[", i, "] has shape ", a[i].sizes());
    const ScalarType xt = x[i].scalar_type(), at = a[i].scalar_type();
    SPARD_CHECK(is_floating(xt), op, ": x[", i, "] must be float32, float16, bfloat16 or float64, got ", xt);
    SPARD_CHECK(is_floating(at), op, ": a[", i, "] must be float32, float16, bfloat16 or float64, got ", at);
    SPARD_CHECK(x[i].device() == device, op, ": all tensors must be on one device: x[0] is on ", device, " but x[", i,
                "] is on ", x[i].device());
    SPARD_CHECK(a[i].device() == device, op, ": all tensors must be on one device: x[0] is on ", device, " but a[", i,
                "] is on ", a[i].device());
    if (!writes_x) continue;
    int64_t numel = 1;
    for (const int64_t s : x_sizes) numel *= s;
    if (numel == 0) continue;
    // The mutable pointer, as the update takes it (it materialises a lazily cloned tensor).
    spans.push_back(writable_span(x[i], i, xt, numel, x[i].is_contiguous(), x[i].mutable_data_ptr(), op));
  }
  if (writes_x) check_no_shared_memory(spans, op);
}

void check_scalar(const Tensor& t, const char* name, const char* op, const Device& device) {
  SPARD_CHECK(t.numel() == 1, op, ": ", name, " must be a scalar (one element), got shape ", t.sizes());
  SPARD_CHECK(is_floating(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ", t.scalar_type());
  SPARD_CHECK(t.device() == device || t.is_cpu(), op, ": ", name, " must be on ", device, " (or a CPU scalar), got ",
              t.device());
}

void check_max_step(double max_step, const char* op) {
  SPARD_CHECK(max_step >= 0, op, ": max_step must be >= 0 (use inf for no cap), got ", max_step);
}

// ------------------------------------------------------------------------------------------------
// Greedy DPP (none of these reads a device value on the host)
// ------------------------------------------------------------------------------------------------
namespace {

void check_float_matrix(const Tensor& t, const char* name, const char* op) {
  SPARD_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D tensor, got shape ", t.sizes());
  SPARD_CHECK(t.scalar_type() == ScalarType::Float || t.scalar_type() == ScalarType::Double, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

std::optional<Tensor> mask_or_none(const std::optional<Tensor>& m, const char* name, int64_t n, const Tensor& like,
                                   const char* op) {
  if (!m.has_value()) return std::nullopt;
  const Tensor& t = *m;
  SPARD_CHECK(t.scalar_type() == ScalarType::Bool, op, ": ", name, " must be a bool mask, got ", t.scalar_type());
  SPARD_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be a 1-D mask of length N = ", n, ", got shape ",
              t.sizes());
  SPARD_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), " like the kernel, got ",
              t.device());
  return as_contiguous(t);  // a bool is one byte, 0 or 1: the kernels read it as uint8
}

DppInputs check_common(const Tensor& mat, bool dense, int64_t k, double eps_stop, const std::optional<Tensor>& include,
                       const std::optional<Tensor>& exclude, const char* op) {
  SPARD_CHECK(k >= 0, op, ": k must be >= 0, got ", k);
  SPARD_CHECK(!std::isnan(eps_stop), op, ": eps_stop must not be NaN");
  DppInputs in;
  in.op = op;
  in.name = dense ? "kernel" : "factor";
  in.dense = dense;
  in.float32 = mat.scalar_type() == ScalarType::Float;
  in.n = mat.size(0);
  in.k = std::min<int64_t>(k, in.n);
  in.include = mask_or_none(include, "include", in.n, mat, op);
  in.exclude = mask_or_none(exclude, "exclude", in.n, mat, op);
  return in;
}

}  // namespace

void check_deferred(const DppInputs& in, const double* v) {
  SPARD_CHECK(v[0] == 1.0, in.op, ": ", in.name, " must be finite (it holds NaN or Inf)");
  if (in.dense) {
    // Symmetric up to rounding: a kernel built as F·Fᵀ in float32 passes, a wrong matrix does not.
    const double tol = (in.float32 ? 1e-5 : 1e-10) * std::max(v[2], 1e-30);
    SPARD_CHECK(v[1] <= tol, in.op, ": kernel must be symmetric, max |L - Lᵀ| = ", v[1], " (tolerance ", tol, ")");
  }
  SPARD_CHECK(v[3] == 0.0, in.op, ": include and exclude must not share an item");
}

DppInputs check_dpp_dense(const Tensor& kernel, int64_t k, double eps_stop, const std::optional<Tensor>& include,
                          const std::optional<Tensor>& exclude) {
  const char* op = "dpp_greedy_dense";
  check_float_matrix(kernel, "kernel", op);
  SPARD_CHECK(kernel.size(0) == kernel.size(1), op, ": kernel must be square (N x N), got shape ", kernel.sizes());
  return check_common(kernel, true, k, eps_stop, include, exclude, op);
}

DppInputs check_dpp_lowrank(const Tensor& factor, int64_t k, double eps, double eps_stop,
                            const std::optional<Tensor>& include, const std::optional<Tensor>& exclude,
                            const std::string& method, DppMethod& resolved) {
  const char* op = "dpp_greedy_lowrank";
  check_float_matrix(factor, "factor", op);
  SPARD_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  SPARD_CHECK(method == "auto" || method == "cholesky" || method == "inverse", op,
              ": method must be 'auto', 'cholesky' or 'inverse', got '", method, "'");
  SPARD_CHECK(!(method == "inverse" && eps == 0), op, ": method 'inverse' needs eps > 0 (it starts from A = I / eps)");
  DppInputs in = check_common(factor, false, k, eps_stop, include, exclude, op);
  resolved = resolve_dpp_method(method, eps, in.n, factor.size(1), in.k);
  return in;
}

}  // namespace spard
