// Python module of the extension. Importing it runs the TORCH_LIBRARY registrations, which make
// the ops available as torch.ops.spard_ext.*.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "SPARD kernels; the ops live in torch.ops.spard_ext";
#ifdef SPARD_WITH_CUDA
  m.attr("cuda_kernels") = true;
#else
  m.attr("cuda_kernels") = false;
#endif
}
