// Input checks of the CUDA kernels (`_C_cuda`, regular ATen ABI), in checks.cpp. The CPU kernels
// (`_C`, stable ABI) have their own, with the same messages; `_C_cuda` does not link `_C`.
//
// Projection: see ../project.h.
//
// Greedy DPP MAP inference:
//
// Two forms of the kernel: a dense PSD matrix L (N x N), or a low-rank factor F (N x D) with a
// ridge, L = F Fᵀ + eps·I, where the N x N matrix is never built. Two updates:
//   cholesky: the incremental Cholesky update of Chen, Zhang, Zhou (2018); O(N k) memory.
//   inverse:  low-rank only; keeps A = (F_Yᵀ F_Y + eps·I)⁻¹ (D x D, fp64) and one direction
//             u_t per pick; d²_i = eps·(1 + f_iᵀ A f_i); O(N + k D + D²) memory.
// Both return the picks in order and d² at pick time (fp64), so log det L_Y = Σ log d².
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../dpp_method.h"
#include "../message.h"
#include "../project.h"

namespace spard {

// Runs the body with `tx` and `ta` bound to the element types of the x and a tensors.
#define SPARD_DISPATCH_PAIR(TX, TA, NAME, ...)                                                    \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TX, NAME, [&] {                        \
    using tx = scalar_t;                                                                          \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TA, NAME, [&] {                      \
      using ta = scalar_t;                                                                        \
      __VA_ARGS__();                                                                              \
    });                                                                                           \
  })

// Validates the two lists (same length, same shapes pairwise, floating dtypes, one device).
// With writes_x, also that every x[i] can be written in place (no element shares memory with
// another, not an inference tensor outside inference mode): all checks run before any write.
void check_pair_lists(at::TensorList x, at::TensorList a, const char* op, bool writes_x);
void check_scalar(const at::Tensor& t, const char* name, const char* op, const at::Device& device);
void check_max_step(double max_step, const char* op);

std::vector<at::Tensor> contiguous_list(at::TensorList ts);

// Writes a contiguous working copy back into a non-contiguous destination.
void copy_back(at::TensorList dst, const std::vector<at::Tensor>& work);

// Validated inputs: masks as uint8 (0/1) tensors of length N on the input's device.
//
// The checks that need a pass over the data (finite entries, a symmetric kernel, disjoint
// masks) are computed on the input's device into `deferred` without reading them on the host:
// the CPU backend checks them before its loop (check_deferred), the CUDA backend reads them
// together with the number of picks, in the one host read after its loop, and raises then.
struct DppInputs {
  int64_t n = 0;
  int64_t k = 0;  // min(k, N)
  at::Tensor include;  // uint8 [N], all zero when not given
  at::Tensor exclude;  // uint8 [N], all zero when not given
  at::Tensor deferred;  // float64 [kDeferredChecks] on the input's device, see check_deferred
  const char* op = "";
  const char* name = "";  // "kernel" or "factor"
  bool dense = false;
  bool float32 = false;
};

constexpr int64_t kDeferredChecks = 4;  // all finite (1/0), max |L - Lᵀ|, max |L|, masks overlap (1/0)

// Raises the error of the first failed deferred check; `values` are the kDeferredChecks values.
void check_deferred(const DppInputs& in, const double* values);

// Checks the dense kernel (square, symmetric, finite, float32/float64) and the common arguments.
DppInputs check_dpp_dense(const at::Tensor& kernel, int64_t k, double eps_stop,
                          const std::optional<at::Tensor>& include,
                          const std::optional<at::Tensor>& exclude);

// Checks the factor (2-D, finite, float32/float64), eps and the common arguments; resolves the
// method ("auto" picks the cheaper update for these sizes).
DppInputs check_dpp_lowrank(const at::Tensor& factor, int64_t k, double eps, double eps_stop,
                            const std::optional<at::Tensor>& include,
                            const std::optional<at::Tensor>& exclude, const std::string& method,
                            DppMethod& resolved);

}  // namespace spard
