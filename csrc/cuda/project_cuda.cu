// CUDA backend of the projection ops, in the style of apex's multi_tensor_apply.
//
// The flattened list is cut into fixed chunks; one block handles one chunk. A metadata table
// (per tensor: x pointer, a pointer, numel; per block: tensor index, chunk index) is uploaded
// with one asynchronous copy from pinned memory. Each block writes its partial sums into its
// own slot (no atomics), a one-block kernel sums the slots in a fixed order and forms the step
// coefficient on the device, and the update kernel reads the coefficient through a pointer.
// Nothing here waits for the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>

#include "../project.h"

namespace spard {
namespace {

constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kThreads = 512;
constexpr int kFinalThreads = 512;

template <typename T>
__device__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Deterministic block sum; the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < warps ? shared[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

struct Table {
  const int64_t* tensors;  // [n_tensors][3]: x ptr, a ptr, numel
  const int64_t* blocks;   // [n_blocks][2]: tensor index, chunk index
};

template <typename tx, typename ta, bool UseDot>
__global__ void __launch_bounds__(kThreads) reduce_kernel(Table table, double* partials) {
  using acc = acc_type<tx, ta>;
  __shared__ acc shared[2][kThreads / 32];
  const int64_t t = table.blocks[2 * blockIdx.x];
  const int64_t chunk = table.blocks[2 * blockIdx.x + 1];
  const tx* x = reinterpret_cast<const tx*>(table.tensors[3 * t]);
  const ta* a = reinterpret_cast<const ta*>(table.tensors[3 * t + 1]);
  const int64_t n = table.tensors[3 * t + 2];
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  acc d = 0, s = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const acc av = static_cast<acc>(a[i]);
    s += av * av;
    if constexpr (UseDot) d += static_cast<acc>(x[i]) * av;
  }
  s = block_sum(s, shared[0]);
  if constexpr (UseDot) d = block_sum(d, shared[1]);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = UseDot ? static_cast<double>(d) : 0.0;
    partials[2 * blockIdx.x + 1] = static_cast<double>(s);
  }
}

template <typename tx, typename ta>
__global__ void __launch_bounds__(kThreads) update_kernel(Table table, const float* coef_ptr) {
  using acc = acc_type<tx, ta>;
  const acc coef = static_cast<acc>(*coef_ptr);
  if (coef == acc(0)) return;  // x stays bit-identical when there is nothing to do
  const int64_t t = table.blocks[2 * blockIdx.x];
  const int64_t chunk = table.blocks[2 * blockIdx.x + 1];
  tx* x = reinterpret_cast<tx*>(table.tensors[3 * t]);
  const ta* a = reinterpret_cast<const ta*>(table.tensors[3 * t + 1]);
  const int64_t n = table.tensors[3 * t + 2];
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    x[i] = static_cast<tx>(static_cast<acc>(x[i]) - coef * static_cast<acc>(a[i]));
  }
}

// Sums the per-block slots in a fixed order; optionally forms the step coefficient.
__global__ void __launch_bounds__(kFinalThreads)
    finalize_kernel(const double* partials, int64_t n_slots, const float* b, float max_step, bool use_dot,
                    float* dot_out, float* sq_out, float* coef_out) {
  __shared__ double shared[2][kFinalThreads / 32];
  double d = 0, s = 0;
  for (int64_t i = threadIdx.x; i < n_slots; i += kFinalThreads) {
    d += partials[2 * i];
    s += partials[2 * i + 1];
  }
  d = block_sum(d, shared[0]);
  s = block_sum(s, shared[1]);
  if (threadIdx.x == 0) {
    const float df = use_dot ? static_cast<float>(d) : 0.f, sf = static_cast<float>(s);
    *dot_out = df;
    *sq_out = sf;
    if (coef_out != nullptr) *coef_out = projection_coef(df, sf, *b, max_step, use_dot);
  }
}

__global__ void coef_kernel(const float* dot, const float* sq, const float* b, float max_step, bool use_dot,
                            float* coef_out) {
  *coef_out = projection_coef(*dot, *sq, *b, max_step, use_dot);
}

// One launch group per (x dtype, a dtype) pair, each with its own slice of the table.
struct Group {
  at::ScalarType tx, ta;
  int64_t tensor_offset = 0, block_offset = 0, n_blocks = 0;
};

struct Plan {
  std::vector<Group> groups;
  at::Tensor table;  // int64 on the device
  int64_t n_blocks = 0;
  Table view(const Group& g) const {
    const int64_t* base = table.const_data_ptr<int64_t>();
    return Table{base + 3 * g.tensor_offset, base + g.block_offset};
  }
};

Plan make_plan(const std::vector<at::Tensor>& x, const std::vector<at::Tensor>& a) {
  std::map<std::pair<int, int>, std::vector<size_t>> by_dtype;
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i].numel() == 0) continue;
    by_dtype[{static_cast<int>(x[i].scalar_type()), static_cast<int>(a[i].scalar_type())}].push_back(i);
  }
  Plan plan;
  int64_t n_tensors = 0;
  for (const auto& kv : by_dtype) {
    for (size_t i : kv.second) plan.n_blocks += (x[i].numel() + kChunk - 1) / kChunk;
    n_tensors += static_cast<int64_t>(kv.second.size());
  }
  if (plan.n_blocks == 0) return plan;
  const int64_t blocks_base = 3 * n_tensors;
  auto host = at::empty({blocks_base + 2 * plan.n_blocks}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.mutable_data_ptr<int64_t>();
  int64_t tensor_row = 0, block_row = 0;
  for (const auto& kv : by_dtype) {
    Group g{static_cast<at::ScalarType>(kv.first.first), static_cast<at::ScalarType>(kv.first.second)};
    g.tensor_offset = tensor_row;
    g.block_offset = blocks_base + 2 * block_row;
    for (size_t k = 0; k < kv.second.size(); ++k) {
      const size_t i = kv.second[k];
      h[3 * tensor_row] = reinterpret_cast<int64_t>(x[i].data_ptr());
      h[3 * tensor_row + 1] = reinterpret_cast<int64_t>(a[i].data_ptr());
      h[3 * tensor_row + 2] = x[i].numel();
      for (int64_t c = 0; c * kChunk < x[i].numel(); ++c) {
        h[blocks_base + 2 * block_row] = static_cast<int64_t>(k);
        h[blocks_base + 2 * block_row + 1] = c;
        ++block_row;
        ++g.n_blocks;
      }
      ++tensor_row;
    }
    plan.groups.push_back(g);
  }
  plan.table = host.to(x[0].device(), at::kLong, /*non_blocking=*/true);
  return plan;
}

// Launches the per-block reductions; returns the slots (double, [n_blocks][2]).
at::Tensor launch_reduce(const Plan& plan, bool use_dot, const at::Device& device, cudaStream_t stream) {
  auto partials = at::empty({std::max<int64_t>(plan.n_blocks, 1), 2},
                            at::TensorOptions().dtype(at::kDouble).device(device));
  int64_t slot = 0;
  for (const Group& g : plan.groups) {
    double* out = partials.mutable_data_ptr<double>() + 2 * slot;
    SPARD_DISPATCH_PAIR(g.tx, g.ta, "project_reduce", [&] {
      if (use_dot) {
        reduce_kernel<tx, ta, true><<<g.n_blocks, kThreads, 0, stream>>>(plan.view(g), out);
      } else {
        reduce_kernel<tx, ta, false><<<g.n_blocks, kThreads, 0, stream>>>(plan.view(g), out);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    slot += g.n_blocks;
  }
  return partials;
}

void launch_update(const Plan& plan, const float* coef, cudaStream_t stream) {
  for (const Group& g : plan.groups) {
    SPARD_DISPATCH_PAIR(g.tx, g.ta, "project_apply_", [&] {
      update_kernel<tx, ta><<<g.n_blocks, kThreads, 0, stream>>>(plan.view(g), coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

at::Tensor scalar_on(const at::Device& device) {
  return at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
}

at::Tensor float_on(const at::Tensor& t, const at::Device& device) {
  return t.to(device, at::kFloat, /*non_blocking=*/false).reshape({});
}

at::Device device_of(at::TensorList x, const at::Tensor& fallback) {
  return x.empty() ? fallback.device() : x[0].device();
}

std::tuple<at::Tensor, at::Tensor> project_reduce_cuda(at::TensorList x, at::TensorList a, bool use_dot) {
  check_pair_lists(x, a, "project_reduce");
  TORCH_CHECK_VALUE(!x.empty(), "project_reduce: x must not be empty on CUDA");
  const at::Device device = x[0].device();
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto xc = contiguous_list(x), ac = contiguous_list(a);
  const Plan plan = make_plan(xc, ac);
  const at::Tensor partials = launch_reduce(plan, use_dot, device, stream);
  at::Tensor dot = scalar_on(device), sq = scalar_on(device);
  finalize_kernel<<<1, kFinalThreads, 0, stream>>>(partials.const_data_ptr<double>(), plan.n_blocks, nullptr,
                                                   0.f, use_dot, dot.mutable_data_ptr<float>(),
                                                   sq.mutable_data_ptr<float>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dot, sq};
}

at::Tensor project_apply_cuda(at::TensorList x, at::TensorList a, const at::Tensor& dot, const at::Tensor& sqnorm,
                              const at::Tensor& b, double max_step, bool use_dot) {
  check_pair_lists(x, a, "project_apply_");
  const at::Device device = device_of(x, b);
  check_scalar(dot, "dot", "project_apply_", device);
  check_scalar(sqnorm, "sqnorm", "project_apply_", device);
  check_scalar(b, "b", "project_apply_", device);
  check_max_step(max_step, "project_apply_");
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor dot_d = float_on(dot, device), sq_d = float_on(sqnorm, device), b_d = float_on(b, device);
  at::Tensor coef = scalar_on(device);
  coef_kernel<<<1, 1, 0, stream>>>(dot_d.const_data_ptr<float>(), sq_d.const_data_ptr<float>(),
                                   b_d.const_data_ptr<float>(), static_cast<float>(max_step), use_dot,
                                   coef.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto xc = contiguous_list(x);
  const auto ac = contiguous_list(a);
  launch_update(make_plan(xc, ac), coef.const_data_ptr<float>(), stream);
  copy_back(x, xc);
  return coef;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> project_fused_cuda(at::TensorList x, at::TensorList a,
                                                                  const at::Tensor& b, double max_step,
                                                                  bool use_dot) {
  check_pair_lists(x, a, "project_");
  const at::Device device = device_of(x, b);
  check_scalar(b, "b", "project_", device);
  check_max_step(max_step, "project_");
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto xc = contiguous_list(x);
  const auto ac = contiguous_list(a);
  const Plan plan = make_plan(xc, ac);
  const at::Tensor partials = launch_reduce(plan, use_dot, device, stream);
  const at::Tensor b_d = float_on(b, device);
  at::Tensor dot = scalar_on(device), sq = scalar_on(device), coef = scalar_on(device);
  finalize_kernel<<<1, kFinalThreads, 0, stream>>>(partials.const_data_ptr<double>(), plan.n_blocks,
                                                   b_d.const_data_ptr<float>(), static_cast<float>(max_step),
                                                   use_dot, dot.mutable_data_ptr<float>(),
                                                   sq.mutable_data_ptr<float>(), coef.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_update(plan, coef.const_data_ptr<float>(), stream);
  copy_back(x, xc);
  return {coef, dot, sq};
}

}  // namespace
}  // namespace spard

TORCH_LIBRARY_IMPL(spard_ext, CUDA, m) {
  m.impl("project_reduce", &spard::project_reduce_cuda);
  m.impl("project_apply_", &spard::project_apply_cuda);
  m.impl("project_", &spard::project_fused_cuda);
}
