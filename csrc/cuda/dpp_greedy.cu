// CUDA backend of greedy DPP MAP inference.
//
// The whole loop stays on the device. Each pick is a fixed sequence of kernels launched on the
// current stream; the picked index, its gain and a "done" flag live in a small device struct
// that every kernel reads through a pointer, so the host never waits for the device inside the
// loop. The pick kernel also writes the loop's progress into mapped pinned host memory, which
// the host reads with no CUDA call: it stops launching once the stop rule has fired and stays
// at most kLookahead steps ahead of the device (launches enqueued ahead of a stop return at
// once). The host reads the device once, at the end: the number of picks together with the
// input checks that need a pass over the data (finite, symmetric, disjoint masks; see checks.h).
//
// Both updates run eagerly (every candidate's gain is updated at every pick; the CPU backend's
// lazy refresh gives the same picks). Sums are taken in fp64 like on the CPU; the summation
// order differs, so gains agree to rounding and picks agree unless two gains tie to rounding.
// Rows of F are read with 16-byte loads where aligned; the Cholesky update spreads the sum over
// earlier picks across the threads of a block (kPickSplit) rather than one thread per item.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <thread>

#include "checks.h"

namespace spard {
namespace {

constexpr int kThreads = 256;
constexpr int kSlots = 256;  // blocks of the first argmax stage (= threads of the second)
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
constexpr uint8_t kFree = 0, kPicked = 1;
constexpr int kItemsPerBlock = 32;  // Cholesky update: items of a block (one per lane) ...
constexpr int kPickSplit = 8;       // ... times the ways the sum over earlier picks is split
constexpr int64_t kLookahead = 4;   // steps the host may enqueue ahead of the device

struct State {
  int64_t j;             // last pick
  double gain;           // its d²
  int64_t include_left;  // included items not yet picked
  int64_t count;         // picks so far
  int32_t done;          // stop rule fired or no candidate left
};

__device__ __forceinline__ bool beats(double v, int64_t i, double bv, int64_t bi) {
  return v > bv || (v == bv && i < bi);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block argmax of (value, index) pairs; the result is valid in thread 0.
__device__ void block_argmax(double& v, int64_t& i) {
  __shared__ double sv[kThreads];
  __shared__ int64_t si[kThreads];
  sv[threadIdx.x] = v;
  si[threadIdx.x] = i;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half && beats(sv[threadIdx.x + half], si[threadIdx.x + half], sv[threadIdx.x], si[threadIdx.x])) {
      sv[threadIdx.x] = sv[threadIdx.x + half];
      si[threadIdx.x] = si[threadIdx.x + half];
    }
    __syncthreads();
  }
  v = sv[0];
  i = si[0];
}

__global__ void init_state(State* st, const int64_t* include_count) {
  st->j = 0;
  st->gain = 0;
  st->include_left = *include_count;
  st->count = 0;
  st->done = 0;
}

__global__ void __launch_bounds__(kThreads)
    argmax_partial(const double* d2, const uint8_t* status, const uint8_t* include, int64_t n, const State* st,
                   double* slot_v, int64_t* slot_i) {
  if (st->done) return;
  const bool include_phase = st->include_left > 0;
  double bv = -INFINITY;
  int64_t bi = kNone;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (status[i] == kFree && (!include_phase || include[i])) {
      const double v = d2[i];
      if (beats(v, i, bv, bi)) {
        bv = v;
        bi = i;
      }
    }
  }
  block_argmax(bv, bi);
  if (threadIdx.x == 0) {
    slot_v[blockIdx.x] = bv;
    slot_i[blockIdx.x] = bi;
  }
}

// Second argmax stage; records the pick or sets the done flag (stop rule as on the CPU).
// progress (mapped host memory, may be null): [0] steps decided, [1] 1 once the loop is done.
__global__ void __launch_bounds__(kSlots)
    argmax_final(const double* slot_v, const int64_t* slot_i, State* st, uint8_t* status, const uint8_t* include,
                 int64_t* out_idx, double* out_gain, int64_t t, double eps_stop, volatile int64_t* progress) {
  if (st->done) return;
  double bv = slot_v[threadIdx.x];
  int64_t bi = slot_i[threadIdx.x];
  block_argmax(bv, bi);
  if (threadIdx.x == 0) {
    if (progress != nullptr) progress[0] = t + 1;
    if (bi == kNone || !(bv >= eps_stop && bv > 0)) {
      st->done = 1;
      if (progress != nullptr) {
        progress[1] = 1;
        __threadfence_system();
      }
      return;
    }
    st->j = bi;
    st->gain = bv;
    st->count = t + 1;
    out_idx[t] = bi;
    out_gain[t] = bv;
    status[bi] = kPicked;
    if (include[bi]) st->include_left -= 1;
  }
}

int64_t warp_blocks(int64_t rows) {
  const int64_t warps_per_block = kThreads / 32;
  return std::max<int64_t>(1, std::min<int64_t>((rows + warps_per_block - 1) / warps_per_block, 16384));
}

// V elements of T as one 16-byte access.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int V = 16 / sizeof(T);
  T v[V];
};

// Σ_c row[c]·other[c] over one warp (lane 0 holds the result), in fp64. `vec`: row is 16-byte
// aligned and dim a multiple of the vector width (then rows are read with 16-byte loads).
template <typename T, typename U>
__device__ __forceinline__ double warp_row_dot(const T* __restrict__ row, const U* __restrict__ other, int64_t dim,
                                               int lane, bool vec) {
  constexpr int V = Pack16<T>::V;
  double acc = 0;
  int64_t tail = 0;
  if (vec) {
    const int64_t vec_end = dim / V * V;
#pragma unroll 2
    for (int64_t c = static_cast<int64_t>(lane) * V; c < vec_end; c += 32 * V) {
      const Pack16<T> fv = *reinterpret_cast<const Pack16<T>*>(row + c);
#pragma unroll
      for (int v = 0; v < V; ++v) acc += static_cast<double>(other[c + v]) * static_cast<double>(fv.v[v]);
    }
    tail = vec_end;
  }
  for (int64_t c = tail + lane; c < dim; c += 32) acc += static_cast<double>(other[c]) * static_cast<double>(row[c]);
  return warp_sum(acc);
}

// Whether every row of an N x D matrix at f can be read with 16-byte loads.
template <typename T>
bool rows_vectorisable(const T* f, int64_t dim) {
  return reinterpret_cast<uintptr_t>(f) % 16 == 0 && dim % Pack16<T>::V == 0;
}

// d2_i = eps + |f_i|² (one warp per row).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    init_norms(const T* __restrict__ f, int64_t n, int64_t dim, double eps, bool vec, double* __restrict__ d2) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; r < n; r += warps) {
    const T* fr = f + r * dim;
    const double acc = warp_row_dot(fr, fr, dim, lane, vec);
    if (lane == 0) d2[r] = eps + acc;
  }
}

// ------------------------------------------------------------------------------------------------
// Inverse update (low-rank)
// ------------------------------------------------------------------------------------------------
// g = A f_j (one warp per row of A).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    inv_gather(const double* a, const T* f, int64_t dim, const State* st, double* g) {
  if (st->done) return;
  const int lane = threadIdx.x & 31;
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  if (r >= dim) return;
  const T* fj = f + st->j * dim;
  double acc = 0;
  for (int64_t c = lane; c < dim; c += 32) acc += a[r * dim + c] * static_cast<double>(fj[c]);
  acc = warp_sum(acc);
  if (lane == 0) g[r] = acc;
}

// s = 1 + f_jᵀ g, u = sqrt(eps / s)·g (one block).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    inv_direction(const double* g, const T* f, int64_t dim, const State* st, double eps, double* u, double* s_out) {
  if (st->done) return;
  __shared__ double partial[kThreads / 32];
  __shared__ double s_shared;
  const T* fj = f + st->j * dim;
  double acc = 0;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) acc += g[c] * static_cast<double>(fj[c]);
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int w = 0; w < kThreads / 32; ++w) s += partial[w];
    s_shared = 1.0 + s;
    *s_out = s_shared;
  }
  __syncthreads();
  const double scale = sqrt(eps / s_shared);
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) u[c] = scale * g[c];
}

// A -= (g gᵀ) / s.
__global__ void __launch_bounds__(kThreads)
    inv_update_a(double* a, const double* g, const double* s, int64_t dim, const State* st) {
  if (st->done) return;
  const double s_val = *s;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < dim * dim;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / dim, c = idx % dim;
    a[idx] -= (g[r] / s_val) * g[c];
  }
}

// d2_i -= (uᵀ f_i)² for the items still free (one warp per row): the pass that reads all of F
// at every pick, so 16-byte loads.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    inv_sweep(const T* __restrict__ f, int64_t n, int64_t dim, bool vec, const double* __restrict__ u,
              const uint8_t* __restrict__ status, const State* st, double* __restrict__ d2) {
  if (st->done) return;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; r < n; r += warps) {
    if (status[r] != kFree) continue;  // same branch for the whole warp
    const double acc = warp_row_dot(f + r * dim, u, dim, lane, vec);
    if (lane == 0) d2[r] -= acc * acc;
  }
}

// ------------------------------------------------------------------------------------------------
// Incremental Cholesky (dense, or rows of F Fᵀ + eps·I)
// ------------------------------------------------------------------------------------------------
// e = row j of F Fᵀ + eps·I, written into C[t] (one warp per item).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    chol_row_lowrank(const T* __restrict__ f, int64_t n, int64_t dim, double eps, bool vec, const State* st,
                     double* __restrict__ e) {
  if (st->done) return;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t j = st->j;
  const T* fj = f + j * dim;
  for (int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; r < n; r += warps) {
    const double acc = warp_row_dot(f + r * dim, fj, dim, lane, vec);
    if (lane == 0) e[r] = acc + (r == j ? eps : 0.0);
  }
}

// e_i = (L_ji - Σ_s C[s, j] C[s, i]) / sqrt(d2_j); d2_i -= e_i². L == nullptr: the row is in C[t].
// A block of kItemsPerBlock x kPickSplit threads: lane x takes item i, row y of the block the
// picks s = y, y + kPickSplit, ... (coalesced reads of C[s, i..i+31]), then the kPickSplit
// partial sums of each item are added in shared memory in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kItemsPerBlock* kPickSplit)
    chol_update(const T* __restrict__ l, double* __restrict__ c, int64_t n, int64_t t, const State* st,
                double* __restrict__ d2) {
  if (st->done) return;
  __shared__ double partial[kPickSplit][kItemsPerBlock];
  const int64_t j = st->j;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x;
  double acc = 0;
  if (i < n) {
    for (int64_t s = threadIdx.y; s < t; s += kPickSplit) acc += c[s * n + j] * c[s * n + i];
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && i < n) {
    double sum = 0;
#pragma unroll
    for (int y = 0; y < kPickSplit; ++y) sum += partial[y][threadIdx.x];
    const double row = l != nullptr ? static_cast<double>(l[j * n + i]) : c[t * n + i];
    const double e = (row - sum) / sqrt(st->gain);
    c[t * n + i] = e;
    d2[i] -= e * e;
  }
}

// ------------------------------------------------------------------------------------------------
// Driver
// ------------------------------------------------------------------------------------------------
// Progress of the loop in mapped pinned host memory: [0] steps decided, [1] done. The device
// writes it from argmax_final; the host reads it with plain loads (no CUDA call, no wait).
class HostProgress {
 public:
  HostProgress() {
    buffer_ = at::zeros({2}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    host_ = buffer_.mutable_data_ptr<int64_t>();
    void* dev = nullptr;
    if (cudaHostGetDevicePointer(&dev, host_, 0) == cudaSuccess) {
      device_ = static_cast<int64_t*>(dev);
    } else {
      (void)cudaGetLastError();  // not mapped here: no early stop, the kernels still skip their work
    }
  }
  int64_t* device() const { return device_; }
  bool available() const { return device_ != nullptr; }
  int64_t steps() const { return static_cast<volatile const int64_t*>(host_)[0]; }
  bool done() const { return static_cast<volatile const int64_t*>(host_)[1] != 0; }

 private:
  at::Tensor buffer_;
  int64_t* host_ = nullptr;
  int64_t* device_ = nullptr;
};

// The number of picks is read on the host at the end, and the host waits on the loop's
// progress: neither can happen while the stream is being captured.
void refuse_capture(const char* op) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
  SPARD_CHECK(capture == cudaStreamCaptureStatusNone, op,
              ": cannot be captured in a CUDA graph (the number of picks is read on the host at the end)");
}

struct Loop {
  at::Tensor state, slot_v, slot_i, status, indices, gains;
  State* st;
  const uint8_t* include;
  int64_t n, k;
  c10::cuda::CUDAStream stream;
  HostProgress progress;

  Loop(const DppInputs& in, const at::Device& device, c10::cuda::CUDAStream stream_)
      : n(in.n), k(in.k), stream(stream_) {
    const auto opts = at::TensorOptions().device(device);
    state = at::empty({static_cast<int64_t>(sizeof(State))}, opts.dtype(at::kByte));
    st = reinterpret_cast<State*>(state.mutable_data_ptr());
    slot_v = at::empty({kSlots}, opts.dtype(at::kDouble));
    slot_i = at::empty({kSlots}, opts.dtype(at::kLong));
    // Slots past the blocks of the first stage must never win: the second stage reads them all.
    slot_v.fill_(-std::numeric_limits<double>::infinity());
    slot_i.fill_(kNone);
    status = in.exclude.to(at::kByte).mul(2).contiguous();  // 0 free, 2 barred
    include = in.include.const_data_ptr<uint8_t>();
    indices = at::empty({k}, opts.dtype(at::kLong));
    gains = at::empty({k}, opts.dtype(at::kDouble));
    const at::Tensor include_count = in.include.sum(at::kLong);
    init_state<<<1, 1, 0, stream>>>(st, include_count.const_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Whether to enqueue step t: not once the stop rule has fired; and not more than kLookahead
  // steps ahead of the device (waits on the host-mapped progress, never on a CUDA sync).
  bool may_launch(int64_t t) {
    if (!progress.available()) return true;
    for (;;) {
      if (progress.done()) return false;
      if (t - progress.steps() <= kLookahead) return true;
      // Nothing left on the stream (or an error, which query() raises): the flag is final.
      if (stream.query()) return !progress.done();
      std::this_thread::yield();
    }
  }

  void pick(const double* d2, int64_t t, double eps_stop) {
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kSlots, (n + kThreads - 1) / kThreads)));
    argmax_partial<<<blocks, kThreads, 0, stream>>>(d2, status.const_data_ptr<uint8_t>(), include, n, st,
                                                    slot_v.mutable_data_ptr<double>(),
                                                    slot_i.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    argmax_final<<<1, kSlots, 0, stream>>>(slot_v.const_data_ptr<double>(), slot_i.const_data_ptr<int64_t>(), st,
                                           status.mutable_data_ptr<uint8_t>(), include,
                                           indices.mutable_data_ptr<int64_t>(), gains.mutable_data_ptr<double>(), t,
                                           eps_stop, progress.device());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  std::tuple<at::Tensor, at::Tensor> finish(const DppInputs& in) {
    // The one host read: the deferred input checks and the number of picks, in one copy.
    const at::Tensor count =
        state.narrow(0, offsetof(State, count), sizeof(int64_t)).view(at::kLong).to(at::kDouble);
    const at::Tensor host = at::cat({in.deferred, count}).to(at::kCPU);
    const double* v = host.const_data_ptr<double>();
    check_deferred(in, v);
    const auto picked = static_cast<int64_t>(v[kDeferredChecks]);
    return {indices.narrow(0, 0, picked).clone(), gains.narrow(0, 0, picked).clone()};
  }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> cholesky_cuda(const DppInputs& in, const T* l, const T* f, int64_t dim, double eps,
                                                 double eps_stop, const at::Tensor& d2, c10::cuda::CUDAStream stream) {
  Loop loop(in, d2.device(), stream);
  const int64_t n = in.n, k = in.k;
  at::Tensor c = at::empty({std::max<int64_t>(k, 1), std::max<int64_t>(n, 1)}, d2.options());
  double* cp = c.mutable_data_ptr<double>();
  double* d2p = d2.mutable_data_ptr<double>();
  const bool vec = f != nullptr && rows_vectorisable(f, dim);
  const auto item_blocks = static_cast<unsigned>(std::max<int64_t>(1, (n + kItemsPerBlock - 1) / kItemsPerBlock));
  for (int64_t t = 0; t < k; ++t) {
    if (!loop.may_launch(t)) break;
    loop.pick(d2p, t, eps_stop);
    if (f != nullptr) {
      chol_row_lowrank<T><<<warp_blocks(n), kThreads, 0, stream>>>(f, n, dim, eps, vec, loop.st, cp + t * n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    chol_update<T><<<item_blocks, dim3(kItemsPerBlock, kPickSplit), 0, stream>>>(l, cp, n, t, loop.st, d2p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return loop.finish(in);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> inverse_cuda(const DppInputs& in, const at::Tensor& factor, double eps,
                                                double eps_stop, c10::cuda::CUDAStream stream) {
  const int64_t n = in.n, k = in.k, dim = factor.size(1);
  const T* f = factor.const_data_ptr<T>();
  const bool vec = rows_vectorisable(f, dim);
  const auto dopts = factor.options().dtype(at::kDouble);
  at::Tensor d2 = at::empty({std::max<int64_t>(n, 1)}, dopts);
  double* d2p = d2.mutable_data_ptr<double>();
  if (n > 0) {
    init_norms<T><<<warp_blocks(n), kThreads, 0, stream>>>(f, n, dim, eps, vec, d2p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  Loop loop(in, factor.device(), stream);
  at::Tensor a = at::eye(dim, dopts).div_(eps);
  at::Tensor g = at::empty({std::max<int64_t>(dim, 1)}, dopts), u = at::empty_like(g), s = at::empty({1}, dopts);
  double* ap = a.mutable_data_ptr<double>();
  double* gp = g.mutable_data_ptr<double>();
  double* up = u.mutable_data_ptr<double>();
  double* sp = s.mutable_data_ptr<double>();
  const uint8_t* status = loop.status.const_data_ptr<uint8_t>();
  const int a_blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((dim * dim + kThreads - 1) / kThreads, 4096)));
  for (int64_t t = 0; t < k; ++t) {
    if (!loop.may_launch(t)) break;
    loop.pick(d2p, t, eps_stop);
    inv_gather<T><<<warp_blocks(dim), kThreads, 0, stream>>>(ap, f, dim, loop.st, gp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    inv_direction<T><<<1, kThreads, 0, stream>>>(gp, f, dim, loop.st, eps, up, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    inv_update_a<<<a_blocks, kThreads, 0, stream>>>(ap, gp, sp, dim, loop.st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    inv_sweep<T><<<warp_blocks(n), kThreads, 0, stream>>>(f, n, dim, vec, up, status, loop.st, d2p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return loop.finish(in);
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_dense_cuda(const at::Tensor& kernel, int64_t k, double eps_stop,
                                                         const std::optional<at::Tensor>& include,
                                                         const std::optional<at::Tensor>& exclude) {
  c10::cuda::CUDAGuard guard(kernel.device());
  refuse_capture("dpp_greedy_dense");
  const DppInputs in = check_dpp_dense(kernel, k, eps_stop, include, exclude);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor l = kernel.contiguous();
  at::Tensor d2 = l.diagonal().to(at::kDouble).clone(at::MemoryFormat::Contiguous);  // never a view of L
  return AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "dpp_greedy_dense", [&] {
    return cholesky_cuda<scalar_t>(in, l.const_data_ptr<scalar_t>(), nullptr, 0, 0.0, eps_stop, d2, stream);
  });
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_lowrank_cuda(const at::Tensor& factor, int64_t k, double eps,
                                                           double eps_stop, const std::optional<at::Tensor>& include,
                                                           const std::optional<at::Tensor>& exclude,
                                                           c10::string_view method) {
  c10::cuda::CUDAGuard guard(factor.device());
  refuse_capture("dpp_greedy_lowrank");
  DppMethod resolved;
  const DppInputs in = check_dpp_lowrank(factor, k, eps, eps_stop, include, exclude, std::string(method), resolved);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor f = factor.contiguous();
  const int64_t n = in.n, dim = f.size(1);
  return AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "dpp_greedy_lowrank", [&] {
    if (resolved == DppMethod::kInverse) return inverse_cuda<scalar_t>(in, f, eps, eps_stop, stream);
    at::Tensor d2 = at::empty({std::max<int64_t>(n, 1)}, f.options().dtype(at::kDouble));
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    if (n > 0) {
      init_norms<scalar_t><<<warp_blocks(n), kThreads, 0, stream>>>(fp, n, dim, eps, rows_vectorisable(fp, dim),
                                                                    d2.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return cholesky_cuda<scalar_t>(in, nullptr, fp, dim, eps, eps_stop, d2, stream);
  });
}

}  // namespace
}  // namespace spard

TORCH_LIBRARY_IMPL(spard_ext, CUDA, m) {
  m.impl("dpp_greedy_dense", &spard::dpp_greedy_dense_cuda);
  m.impl("dpp_greedy_lowrank", &spard::dpp_greedy_lowrank_cuda);
}
