// Python module of the CPU kernels. Importing it runs the STABLE_TORCH_LIBRARY registrations of
// the other files, which make the ops available as torch.ops.spard_ext.*. Only pybind11 here:
// the library calls torch through the stable C shim alone (see stable.h).
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  // The CUDA kernels are a separate library (_C_cuda, regular ABI), loaded by spard_ext/_loader.py.
  m.doc() = "SPARD CPU kernels (LibTorch stable ABI); the ops live in torch.ops.spard_ext";
}
