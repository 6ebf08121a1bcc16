// What the CUDA kernels (`_C_cuda`) use of the LibTorch stable ABI, and their host-side input
// checks (checks.cpp). Like the CPU kernels (`_C`, see ../stable.h) the library is compiled with
// TORCH_TARGET_VERSION and calls torch only through its C shim: the device guard, the current
// stream (aoti_torch_get_current_cuda_stream), tensor construction and the few aten ops it needs.
// One build then loads under every torch release from the target on that uses the same CUDA
// major (libcudart's soname); spard_ext/_loader.py checks the major.
//
// The checks raise RuntimeError with the messages of the CPU kernels (../project.cpp,
// ../dpp_greedy.cpp); the Python entry points turn an input refusal into its ValueError /
// TypeError, whatever the device. `_C_cuda` does not link `_C`, hence a copy of the list checks.
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

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include <optional>
#include <string>
#include <vector>

#include "../dpp_method.h"
#include "../project.h"
#include "../stable.h"

#ifndef USE_CUDA
#error "the CUDA kernels need the CUDA part of torch's C shim: compile with -DUSE_CUDA"
#endif

namespace spard {

using torch::stable::Device;

// The current CUDA stream of a device, through the shim (what c10::cuda::getCurrentCUDAStream
// gives a regular extension).
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

inline Device cuda_device(int32_t index) { return Device(torch::headeronly::DeviceType::CUDA, index); }

// An uninitialised tensor on a device (the caching allocator, current stream).
inline Tensor empty_on(torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype, const Device& device) {
  return torch::stable::empty(sizes, dtype, std::nullopt, device);
}

// Validates the two lists (same length, same shapes pairwise, floating dtypes, one device).
// With writes_x, also that no element of an x[i] shares memory with another: all checks run
// before any write. (Inference tensors are refused by the Python side, spard_ext/_autograd.py.)
void check_pair_lists(const std::vector<Tensor>& x, const std::vector<Tensor>& a, const char* op, bool writes_x);
// A one-element floating-point tensor on `device` or on the CPU.
void check_scalar(const Tensor& t, const char* name, const char* op, const Device& device);
void check_max_step(double max_step, const char* op);

// Validated arguments of a dpp_greedy call. The checks that need a pass over the data (finite
// entries, a symmetric kernel, disjoint masks) run on the device (dpp_greedy.cu) and are read
// together with the number of picks, in the one host read after the loop (check_deferred).
struct DppInputs {
  int64_t n = 0;
  int64_t k = 0;  // min(k, N)
  std::optional<Tensor> include;  // contiguous bool [N] on the device, when given
  std::optional<Tensor> exclude;
  const char* op = "";
  const char* name = "";  // "kernel" or "factor"
  bool dense = false;
  bool float32 = false;
};

constexpr int kDeferredChecks = 4;  // all finite (1/0), max |L - Lᵀ|, max |L|, masks overlap (1/0)

// Raises the error of the first failed deferred check; `values` are the kDeferredChecks values.
void check_deferred(const DppInputs& in, const double* values);

// The host-side checks (no device access): the dense kernel (square, float32/float64) or the
// factor (2-D, float32/float64, eps, method), and the common arguments; `resolved` gets the
// update ("auto" picks the cheaper one for these sizes).
DppInputs check_dpp_dense(const Tensor& kernel, int64_t k, double eps_stop, const std::optional<Tensor>& include,
                          const std::optional<Tensor>& exclude);
DppInputs check_dpp_lowrank(const Tensor& factor, int64_t k, double eps, double eps_stop,
                            const std::optional<Tensor>& include, const std::optional<Tensor>& exclude,
                            const std::string& method, DppMethod& resolved);

}  // namespace spard
