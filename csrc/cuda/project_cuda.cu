// CUDA backend of the projection ops, in the style of apex's multi_tensor_apply, on the LibTorch
// stable ABI (see checks.h).
//
// The flattened list is cut into fixed chunks; one block handles one chunk. The metadata of a
// launch (per tensor: x pointer, a pointer, numel, first block) travels by value as a kernel
// argument, so nothing is copied to the device and the ops can be captured in a CUDA graph; a
// list too long for one argument block takes several launches. Each block writes its partial
// sums into its own slot (no atomics), a one-block kernel sums the slots in a fixed order and
// forms the step coefficient on the device (in float64, as the CPU: see projection_coef64), and
// the update kernel reads it through a pointer. Scalars given as CPU tensors (a Python float b) are read on the host and passed by
// value: under CUDA graph capture that value is part of the captured launch, so changing such a
// CPU tensor between replays changes nothing (a b that varies between replays must be a device
// tensor, which the kernels read at replay time). Nothing here waits for the device.
//
// Products are formed in float64, as on the CPU (two float32 values whose product leaves the
// float32 range, e.g. 3e38 * 2, give a finite float64 product, where a float32 product is inf
// and two of opposite sign sum to NaN); the sums are float64 too.
//
// Loads are 128-bit (16 bytes of the wider of the two dtypes per thread) where both tensors are
// aligned for it, with a scalar loop for the tail of a chunk and for misaligned tensors.
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <utility>

#include "checks.h"

namespace spard {
namespace {

constexpr int64_t kChunk = 32768;  // elements per block: a multiple of every vector width
constexpr int kThreads = 512;
constexpr int kFinalThreads = 512;
constexpr int kMaxTensors = 110;  // per launch: keeps the argument block under 4 KB (as PyTorch's)

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

// The tensors of one launch, passed by value.
struct LaunchMeta {
  const void* x[kMaxTensors];
  const void* a[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t first_block[kMaxTensors + 1];  // blocks of tensor i: [first_block[i], first_block[i + 1])
  int32_t n_tensors;
};
static_assert(sizeof(LaunchMeta) + 2 * sizeof(void*) <= 4096, "kernel arguments must fit in 4 KB");

// Tensor of this block (binary search over first_block) and the chunk's range within it.
__device__ __forceinline__ int tensor_of_block(const LaunchMeta& meta, int32_t block) {
  int lo = 0, hi = meta.n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// V elements of T loaded or stored as one access of V * sizeof(T) bytes (16 for the wider dtype).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename tx, typename ta>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(tx) > sizeof(ta) ? sizeof(tx) : sizeof(ta));
}

template <typename T, int V>
__device__ __forceinline__ bool aligned_for(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0;
}

struct Range {
  int64_t begin, end;
};

__device__ __forceinline__ Range chunk_range(const LaunchMeta& meta, int t) {
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) - meta.first_block[t];
  const int64_t begin = chunk * kChunk;
  const int64_t n = meta.numel[t];
  return {begin, begin + kChunk < n ? begin + kChunk : n};
}

// A float value, or a pointer to one on the device (read by the kernel).
struct ScalarArg {
  const float* ptr;
  float value;
  __device__ __forceinline__ float get() const { return ptr != nullptr ? *ptr : value; }
};

// Per block: Σ a² (and Σ x·a) over its chunk, into partials[2 * (slot_base + block)]. Each
// product is formed and summed in double: the products of 16/32-bit inputs are exact there.
template <typename tx, typename ta, bool UseDot>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const __grid_constant__ LaunchMeta meta, int64_t slot_base, double* __restrict__ partials) {
  constexpr int V = vec_width<tx, ta>();
  __shared__ double shared[2][kThreads / 32];
  const int t = tensor_of_block(meta, static_cast<int32_t>(blockIdx.x));
  const Range r = chunk_range(meta, t);
  const tx* __restrict__ x = static_cast<const tx*>(meta.x[t]);
  const ta* __restrict__ a = static_cast<const ta*>(meta.a[t]);
  double d = 0, s = 0;
  int64_t scalar_from = r.begin;
  if (aligned_for<ta, V>(a) && (!UseDot || aligned_for<tx, V>(x))) {
    const int64_t vec_end = r.begin + (r.end - r.begin) / V * V;
#pragma unroll 4
    for (int64_t i = r.begin + static_cast<int64_t>(threadIdx.x) * V; i < vec_end; i += kThreads * V) {
      const Pack<ta, V> av = *reinterpret_cast<const Pack<ta, V>*>(a + i);
      if constexpr (UseDot) {
        const Pack<tx, V> xv = *reinterpret_cast<const Pack<tx, V>*>(x + i);
#pragma unroll
        for (int v = 0; v < V; ++v) d += static_cast<double>(xv.v[v]) * static_cast<double>(av.v[v]);
      }
#pragma unroll
      for (int v = 0; v < V; ++v) s += static_cast<double>(av.v[v]) * static_cast<double>(av.v[v]);
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < r.end; i += kThreads) {
    const double av = static_cast<double>(a[i]);
    s += av * av;
    if constexpr (UseDot) d += static_cast<double>(x[i]) * av;
  }
  s = block_sum(s, shared[0]);
  if constexpr (UseDot) d = block_sum(d, shared[1]);
  if (threadIdx.x == 0) {
    const int64_t slot = slot_base + blockIdx.x;
    partials[2 * slot] = UseDot ? d : 0.0;
    partials[2 * slot + 1] = s;
  }
}

// x[i] -= step * a[i] over the block's chunk; returns at once when the step is 0 (x stays
// bit-identical). As on the CPU: the step (float64, see projection_coef64) rounded to float32 and
// the update in acc (float32 for 16/32-bit inputs); a step beyond the float32 range (a tiny
// ||a||²) is applied in float64.
template <typename tx, typename ta>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const __grid_constant__ LaunchMeta meta, const double* __restrict__ step_ptr) {
  using acc = acc_type<tx, ta>;
  constexpr int V = vec_width<tx, ta>();
  const double step = *step_ptr;
  if (step == 0.0) return;
  const int t = tensor_of_block(meta, static_cast<int32_t>(blockIdx.x));
  const Range r = chunk_range(meta, t);
  tx* __restrict__ x = static_cast<tx*>(const_cast<void*>(meta.x[t]));
  const ta* __restrict__ a = static_cast<const ta*>(meta.a[t]);
  if (!(fabs(step) <= 3.4028234663852886e38)) {
    for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) {
      x[i] = static_cast<tx>(static_cast<double>(x[i]) - step * static_cast<double>(a[i]));
    }
    return;
  }
  const acc coef = static_cast<acc>(static_cast<float>(step));
  int64_t scalar_from = r.begin;
  if (aligned_for<tx, V>(x) && aligned_for<ta, V>(a)) {
    const int64_t vec_end = r.begin + (r.end - r.begin) / V * V;
#pragma unroll 4
    for (int64_t i = r.begin + static_cast<int64_t>(threadIdx.x) * V; i < vec_end; i += kThreads * V) {
      Pack<tx, V> xv = *reinterpret_cast<const Pack<tx, V>*>(x + i);
      const Pack<ta, V> av = *reinterpret_cast<const Pack<ta, V>*>(a + i);
#pragma unroll
      for (int v = 0; v < V; ++v) xv.v[v] = static_cast<tx>(static_cast<acc>(xv.v[v]) - coef * static_cast<acc>(av.v[v]));
      *reinterpret_cast<Pack<tx, V>*>(x + i) = xv;
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < r.end; i += kThreads) {
    x[i] = static_cast<tx>(static_cast<acc>(x[i]) - coef * static_cast<acc>(a[i]));
  }
}

// Sums the per-block slots in a fixed order; optionally forms the step coefficient.
// coef_out: the step as returned (float32, +inf past its range); step_out: the step the update
// applies (float64).
__global__ void __launch_bounds__(kFinalThreads)
    finalize_kernel(const double* __restrict__ partials, int64_t n_slots, ScalarArg b, double max_step, bool use_dot,
                    float* dot_out, float* sq_out, float* coef_out, double* step_out) {
  __shared__ double shared[2][kFinalThreads / 32];
  double d = 0, s = 0;
  for (int64_t i = threadIdx.x; i < n_slots; i += kFinalThreads) {
    d += partials[2 * i];
    s += partials[2 * i + 1];
  }
  d = block_sum(d, shared[0]);
  s = block_sum(s, shared[1]);
  if (threadIdx.x == 0) {
    const float df = use_dot ? to_float(d) : 0.f, sf = to_float(s);
    *dot_out = df;
    *sq_out = sf;
    if (coef_out != nullptr) {
      const double c = projection_coef64(df, sf, b.get(), max_step, use_dot);
      *coef_out = to_float(c);
      *step_out = c;
    }
  }
}

__global__ void coef_kernel(ScalarArg dot, ScalarArg sq, ScalarArg b, double max_step, bool use_dot, float* coef_out,
                            double* step_out) {
  const double c = projection_coef64(dot.get(), sq.get(), b.get(), max_step, use_dot);
  *coef_out = to_float(c);
  *step_out = c;
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
// One launch: a dtype pair and up to kMaxTensors tensors of it.
struct Launch {
  ScalarType tx, ta;
  LaunchMeta meta;
  int64_t n_blocks = 0;
  int64_t slot_base = 0;  // first slot of its blocks in the partials
};

struct Plan {
  std::vector<Launch> launches;
  int64_t n_blocks = 0;
};

// `writable`: x is written (its mutable pointer, which materialises a lazily cloned tensor).
Plan make_plan(const std::vector<Tensor>& x, const std::vector<Tensor>& a, bool writable) {
  std::map<std::pair<int, int>, std::vector<std::pair<size_t, int64_t>>> by_dtype;  // (index, numel)
  for (size_t i = 0; i < x.size(); ++i) {
    const int64_t numel = x[i].numel();
    if (numel == 0) continue;
    by_dtype[{static_cast<int>(x[i].scalar_type()), static_cast<int>(a[i].scalar_type())}].push_back({i, numel});
  }
  Plan plan;
  for (const auto& kv : by_dtype) {
    const auto tx = static_cast<ScalarType>(kv.first.first), ta = static_cast<ScalarType>(kv.first.second);
    bool open = false;  // whether the last launch takes this dtype pair
    for (const auto& [i, numel] : kv.second) {
      const int64_t blocks = (numel + kChunk - 1) / kChunk;
      constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();
      SPARD_CHECK(blocks <= kMaxBlocks, "project_: x[", i, "] has ", numel, " elements, more than ", kMaxBlocks,
                  " chunks of ", kChunk);
      if (!open || plan.launches.back().meta.n_tensors == kMaxTensors ||
          plan.launches.back().n_blocks + blocks > kMaxBlocks) {
        Launch l;
        std::memset(&l.meta, 0, sizeof(LaunchMeta));
        l.tx = tx;
        l.ta = ta;
        l.slot_base = plan.n_blocks;
        plan.launches.push_back(l);
        open = true;
      }
      Launch& l = plan.launches.back();
      const int j = l.meta.n_tensors++;
      l.meta.x[j] = writable ? x[i].mutable_data_ptr() : x[i].const_data_ptr();
      l.meta.a[j] = a[i].const_data_ptr();
      l.meta.numel[j] = numel;
      l.meta.first_block[j] = static_cast<int32_t>(l.n_blocks);
      l.n_blocks += blocks;
      l.meta.first_block[j + 1] = static_cast<int32_t>(l.n_blocks);
      plan.n_blocks += blocks;
    }
  }
  return plan;
}

// Launches the per-block reductions; returns the slots (double, [max(n_blocks, 1)][2]).
Tensor launch_reduce(const Plan& plan, bool use_dot, const Device& device, cudaStream_t stream) {
  Tensor partials = empty_on({std::max<int64_t>(plan.n_blocks, 1), 2}, ScalarType::Double, device);
  double* out = partials.mutable_data_ptr<double>();
  for (const Launch& l : plan.launches) {
    SPARD_DISPATCH_PAIR(l.tx, l.ta, "project_reduce", [&] {
      const auto blocks = static_cast<unsigned>(l.n_blocks);
      if (use_dot) {
        reduce_kernel<tx, ta, true><<<blocks, kThreads, 0, stream>>>(l.meta, l.slot_base, out);
      } else {
        reduce_kernel<tx, ta, false><<<blocks, kThreads, 0, stream>>>(l.meta, l.slot_base, out);
      }
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return partials;
}

void launch_update(const Plan& plan, const double* step, cudaStream_t stream) {
  for (const Launch& l : plan.launches) {
    SPARD_DISPATCH_PAIR(l.tx, l.ta, "project_apply_", [&] {
      update_kernel<tx, ta><<<static_cast<unsigned>(l.n_blocks), kThreads, 0, stream>>>(l.meta, step);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

Tensor scalar_on(const Device& device) { return empty_on({}, ScalarType::Float, device); }

// A list as the kernels work on it: each tensor itself when contiguous, else a contiguous copy
// (`copied` lists those, which are written back into their destinations afterwards).
struct Operands {
  std::vector<Tensor> t;
  std::vector<size_t> copied;
};

Operands contiguous_list(const std::vector<Tensor>& ts) {
  Operands out;
  out.t.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].is_contiguous()) {
      out.t.push_back(ts[i]);
    } else {
      out.t.push_back(torch::stable::contiguous(ts[i]));
      out.copied.push_back(i);
    }
  }
  return out;
}

// Writes the contiguous working copies back into their non-contiguous destinations (on the
// current stream, after the update).
void copy_back(const std::vector<Tensor>& dst, const Operands& work) {
  for (const size_t i : work.copied) {
    Tensor d = dst[i];  // a handle on the same tensor
    torch::stable::copy_(d, work.t[i]);
  }
}

// A scalar for the kernels: a CPU tensor is read here (host memory, no wait for the device) and
// passed by value (captured as a value under CUDA graph capture, see the top of this file); a
// device tensor is read by the kernel (cast to float32 on the stream first when it has another
// dtype; `keep` holds the cast until the launches are enqueued).
ScalarArg scalar_arg(const Tensor& t, std::vector<Tensor>& keep) {
  if (t.is_cpu()) {
    double v = 0;
    dispatch_float(t.scalar_type(), "scalar_arg", [&](auto tag) {
      v = static_cast<double>(*t.const_data_ptr<decltype(tag)>());
    });
    return ScalarArg{nullptr, to_float(v)};
  }
  if (t.scalar_type() == ScalarType::Float) return ScalarArg{t.const_data_ptr<float>(), 0.f};
  keep.push_back(torch::stable::to(t, ScalarType::Float));
  return ScalarArg{keep.back().const_data_ptr<float>(), 0.f};
}

// The device of the call: that of the lists, else of the first CUDA scalar, else the current one
// (an empty list reaches this backend only with a CUDA scalar, or by an explicit redispatch).
Device device_of(const std::vector<Tensor>& x, std::initializer_list<const Tensor*> scalars) {
  if (!x.empty()) return x[0].device();
  for (const Tensor* t : scalars) {
    if (t->is_cuda()) return t->device();
  }
  return cuda_device(torch::stable::accelerator::getCurrentDeviceIndex());
}

// After the input checks: refuses tensors that are not on a CUDA device (an explicit redispatch
// of CPU tensors, as the CI's ABI gate does to reach the checks without a GPU).
void require_cuda(const Device& device, const char* op) {
  SPARD_CHECK(device.is_cuda(), op, ": the CUDA kernels were called with tensors on ", device);
}

std::tuple<Tensor, Tensor> project_reduce_cuda(std::vector<Tensor> x, std::vector<Tensor> a, bool use_dot) {
  check_pair_lists(x, a, "project_reduce", false);
  const Device device = device_of(x, {});
  require_cuda(device, "project_reduce");
  const torch::stable::accelerator::DeviceGuard guard(device.index());
  const cudaStream_t stream = current_stream(device.index());
  const Operands xc = contiguous_list(x), ac = contiguous_list(a);
  const Plan plan = make_plan(xc.t, ac.t, false);
  const Tensor partials = launch_reduce(plan, use_dot, device, stream);
  Tensor dot = scalar_on(device), sq = scalar_on(device);
  finalize_kernel<<<1, kFinalThreads, 0, stream>>>(partials.const_data_ptr<double>(), plan.n_blocks,
                                                   ScalarArg{nullptr, 0.f}, 0.0, use_dot,
                                                   dot.mutable_data_ptr<float>(), sq.mutable_data_ptr<float>(),
                                                   nullptr, nullptr);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return {dot, sq};
}

Tensor project_apply_cuda(std::vector<Tensor> x, std::vector<Tensor> a, Tensor dot, Tensor sqnorm, Tensor b,
                          double max_step, bool use_dot) {
  check_pair_lists(x, a, "project_apply_", true);
  const Device device = device_of(x, {&dot, &sqnorm, &b});
  check_scalar(dot, "dot", "project_apply_", device);
  check_scalar(sqnorm, "sqnorm", "project_apply_", device);
  check_scalar(b, "b", "project_apply_", device);
  check_max_step(max_step, "project_apply_");
  require_cuda(device, "project_apply_");
  const torch::stable::accelerator::DeviceGuard guard(device.index());
  const cudaStream_t stream = current_stream(device.index());
  std::vector<Tensor> keep;
  const ScalarArg dot_arg = scalar_arg(dot, keep), sq_arg = scalar_arg(sqnorm, keep), b_arg = scalar_arg(b, keep);
  Tensor coef = scalar_on(device), step = empty_on({}, ScalarType::Double, device);
  coef_kernel<<<1, 1, 0, stream>>>(dot_arg, sq_arg, b_arg, max_step, use_dot, coef.mutable_data_ptr<float>(),
                                   step.mutable_data_ptr<double>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  const Operands xc = contiguous_list(x), ac = contiguous_list(a);
  launch_update(make_plan(xc.t, ac.t, true), step.const_data_ptr<double>(), stream);
  copy_back(x, xc);
  return coef;
}

std::tuple<Tensor, Tensor, Tensor> project_fused_cuda(std::vector<Tensor> x, std::vector<Tensor> a, Tensor b,
                                                      double max_step, bool use_dot) {
  check_pair_lists(x, a, "project_", true);
  const Device device = device_of(x, {&b});
  check_scalar(b, "b", "project_", device);
  check_max_step(max_step, "project_");
  require_cuda(device, "project_");
  const torch::stable::accelerator::DeviceGuard guard(device.index());
  const cudaStream_t stream = current_stream(device.index());
  std::vector<Tensor> keep;
  const ScalarArg b_arg = scalar_arg(b, keep);
  const Operands xc = contiguous_list(x), ac = contiguous_list(a);
  const Plan plan = make_plan(xc.t, ac.t, true);
  const Tensor partials = launch_reduce(plan, use_dot, device, stream);
  Tensor dot = scalar_on(device), sq = scalar_on(device), coef = scalar_on(device);
  Tensor step = empty_on({}, ScalarType::Double, device);
  finalize_kernel<<<1, kFinalThreads, 0, stream>>>(partials.const_data_ptr<double>(), plan.n_blocks, b_arg, max_step,
                                                   use_dot, dot.mutable_data_ptr<float>(),
                                                   sq.mutable_data_ptr<float>(), coef.mutable_data_ptr<float>(),
                                                   step.mutable_data_ptr<double>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  launch_update(plan, step.const_data_ptr<double>(), stream);
  copy_back(x, xc);
  return {coef, dot, sq};
}

}  // namespace
}  // namespace spard

STABLE_TORCH_LIBRARY_IMPL(spard_ext, CUDA, m) {
  m.impl("project_reduce", TORCH_BOX(&spard::project_reduce_cuda));
  m.impl("project_apply_", TORCH_BOX(&spard::project_apply_cuda));
  m.impl("project_", TORCH_BOX(&spard::project_fused_cuda));
}
