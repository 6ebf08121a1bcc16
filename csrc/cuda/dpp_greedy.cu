// CUDA backend of greedy DPP MAP inference, on the LibTorch stable ABI (see checks.h).
//
// The whole loop stays on the device. Each pick is a fixed sequence of kernels launched on the
// current stream; the picked index, its gain and a "done" flag live in a small device struct
// that every kernel reads through a pointer, so the host never waits for the device inside the
// loop. The pick kernel also writes the loop's progress into mapped pinned host memory, which
// the host reads with no CUDA call (atomic loads with acquire order): it stops launching once
// the stop rule has fired and stays at most kLookahead steps ahead of the device (launches
// enqueued ahead of a stop return at once); while it waits it yields, then sleeps, rather than
// spin a core for the whole loop. The host reads the device once, at the end: the number of
// picks together with the input checks that need a pass over the data (finite, symmetric,
// disjoint masks), which kernels compute on the device (see checks.h).
//
// Both updates run eagerly (every candidate's gain is updated at every pick; the CPU backend's
// lazy refresh gives the same picks). Sums are taken in fp64 like on the CPU; the summation
// order differs, so gains agree to rounding and picks agree unless two gains tie to rounding.
// Rows of F are read with 16-byte loads where aligned; the Cholesky update spreads the sum over
// earlier picks across the threads of a block (kPickSplit) rather than one thread per item.
//
// CUDA graphs: the call reads the device on the host, so it refuses to run while its stream is
// being captured; and it runs in thread-local capture mode, so the CUDA calls it makes (stream
// queries, the final copy) do not invalidate a capture that another thread runs in the global
// mode (torch.cuda.graph's default).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
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
constexpr int64_t kLookahead = 8;   // steps the host may enqueue ahead of the device (slack for its sleeps)

// The device-side checks of the inputs (uint64 words, zeroed before the check kernels run).
constexpr int kNonFinite = 0;     // 1 when an entry is NaN or ±inf
constexpr int kAsymmetry = 1;     // max |L[i, j] - L[j, i]| (float64 bits; non-negative, so they order as uint64)
constexpr int kScale = 2;         // max |entry| (float64 bits)
constexpr int kOverlap = 3;       // 1 when include and exclude share an item
constexpr int kIncludeCount = 4;  // number of included items
constexpr int kCheckWords = 5;

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
  __syncthreads();  // every thread has read the result before a next call overwrites it
}

// Stop rule: the best gain must be >= eps_stop and > 0 (as on the CPU).
__device__ __forceinline__ bool stops(double gain, double eps_stop) { return !(gain >= eps_stop && gain > 0); }

// One block of kSlots threads: the state, and the slots of the second argmax stage (slots past
// the blocks of the first stage must never win: the second stage reads them all). Two sets of
// slots: the pool of the step (the included items while any is left, else all) and, in the
// include phase, all free items.
__global__ void init_state(State* st, const unsigned long long* checks, double* slot_v, int64_t* slot_i) {
  if (threadIdx.x == 0) {
    st->j = 0;
    st->gain = 0;
    st->include_left = static_cast<int64_t>(checks[kIncludeCount]);
    st->count = 0;
    st->done = 0;
  }
  for (int s = threadIdx.x; s < 2 * kSlots; s += blockDim.x) {
    slot_v[s] = -INFINITY;
    slot_i[s] = kNone;
  }
}

// First argmax stage, per block: the best of the step's pool into slot [block] and, in the
// include phase, the best of all free items into slot [kSlots + block].
__global__ void __launch_bounds__(kThreads)
    argmax_partial(const double* d2, const uint8_t* status, const uint8_t* include, int64_t n, const State* st,
                   double* slot_v, int64_t* slot_i) {
  if (st->done) return;
  const bool include_phase = st->include_left > 0;
  double bv = -INFINITY, av = -INFINITY;
  int64_t bi = kNone, ai = kNone;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (status[i] == kFree) {
      const double v = d2[i];
      if (!include_phase || include[i]) {  // include is set in the include phase
        if (beats(v, i, bv, bi)) {
          bv = v;
          bi = i;
        }
      }
      if (include_phase && beats(v, i, av, ai)) {
        av = v;
        ai = i;
      }
    }
  }
  block_argmax(bv, bi);
  if (include_phase) block_argmax(av, ai);  // the same branch for the whole block
  if (threadIdx.x == 0) {
    slot_v[blockIdx.x] = bv;
    slot_i[blockIdx.x] = bi;
    if (include_phase) {
      slot_v[kSlots + blockIdx.x] = av;
      slot_i[kSlots + blockIdx.x] = ai;
    }
  }
}

// Second argmax stage; records the pick or sets the done flag (stop rule as on the CPU). When the
// best included item fails the stop rule, so do the other included items (their gains are no
// larger and only decrease): the include phase ends and the step takes the best of all items
// instead of ending the selection (the CPU kernels' rule).
// progress (mapped host memory, may be null): [0] steps decided, [1] 1 once the loop is done.
__global__ void __launch_bounds__(kSlots)
    argmax_final(const double* slot_v, const int64_t* slot_i, State* st, uint8_t* status, const uint8_t* include,
                 int64_t* out_idx, double* out_gain, int64_t t, double eps_stop, volatile int64_t* progress) {
  if (st->done) return;
  const bool include_phase = st->include_left > 0;
  double bv = slot_v[threadIdx.x];
  int64_t bi = slot_i[threadIdx.x];
  block_argmax(bv, bi);
  double av = -INFINITY;
  int64_t ai = kNone;
  if (include_phase) {  // the same branch for the whole block
    av = slot_v[kSlots + threadIdx.x];
    ai = slot_i[kSlots + threadIdx.x];
    block_argmax(av, ai);
  }
  if (threadIdx.x == 0) {
    if (progress != nullptr) {
      progress[0] = t + 1;
      __threadfence_system();  // the step is seen no later than the done flag
    }
    if (include_phase && bi != kNone && stops(bv, eps_stop)) {
      st->include_left = 0;
      bv = av;
      bi = ai;
    }
    if (bi == kNone || stops(bv, eps_stop)) {
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
    if (include != nullptr && include[bi]) st->include_left -= 1;
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
// Input checks on the device, and the small set-up kernels
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ double warp_max(double v) {
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ unsigned long long bits(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(v));
}

// Over the rows x cols entries of m: whether all are finite, max |entry| and, for a dense
// kernel (dense_n = N, else 0), max |L[i, j] - L[j, i]| over i < j (the difference taken in the
// input's dtype, as on the CPU). One atomic per warp; a maximum does not depend on the order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    data_checks(const T* __restrict__ m, int64_t total, int64_t dense_n, unsigned long long* checks) {
  bool finite = true;
  double scale = 0, asym = 0;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T v = m[idx];
    const double dv = static_cast<double>(v);
    if (!(dv - dv == 0.0)) {
      finite = false;
      continue;
    }
    scale = fmax(scale, fabs(dv));
    if (dense_n > 0) {
      const int64_t i = idx / dense_n, j = idx - i * dense_n;
      if (j > i) {
        const T diff = v - m[j * dense_n + i];
        asym = fmax(asym, fabs(static_cast<double>(diff)));  // fmax drops a NaN (counted as non-finite)
      }
    }
  }
  const bool all_finite = __all_sync(0xffffffffu, finite);
  scale = warp_max(scale);
  asym = warp_max(asym);
  if ((threadIdx.x & 31) == 0) {
    if (!all_finite) atomicOr(checks + kNonFinite, 1ull);
    atomicMax(checks + kScale, bits(scale));
    if (dense_n > 0) atomicMax(checks + kAsymmetry, bits(asym));
  }
}

// The number of included items and whether a mask pair overlaps; the item status (0 free,
// 2 barred). include / exclude may be null (not given).
__global__ void __launch_bounds__(kThreads)
    mask_setup(const uint8_t* include, const uint8_t* exclude, int64_t n, uint8_t* status,
               unsigned long long* checks) {
  unsigned long long count = 0;
  bool overlap = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool inc = include != nullptr && include[i] != 0;
    const bool exc = exclude != nullptr && exclude[i] != 0;
    count += inc ? 1 : 0;
    overlap = overlap || (inc && exc);
    status[i] = exc ? 2 : kFree;
  }
  count = warp_sum(count);
  const bool any_overlap = __any_sync(0xffffffffu, overlap);
  if ((threadIdx.x & 31) == 0) {
    if (count != 0) atomicAdd(checks + kIncludeCount, count);
    if (any_overlap) atomicOr(checks + kOverlap, 1ull);
  }
}

// d2_i = L_ii.
template <typename T>
__global__ void init_diag(const T* __restrict__ l, int64_t n, double* __restrict__ d2) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    d2[i] = static_cast<double>(l[i * n + i]);
  }
}

// A = I / eps (dim x dim).
__global__ void init_inverse(double* a, int64_t dim, double inv_eps) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < dim * dim;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    a[idx] = (idx / dim == idx % dim) ? inv_eps : 0.0;
  }
}

// The values of the one host read: the deferred checks (see check_deferred) and the picks.
__global__ void gather_result(const unsigned long long* checks, const State* st, double* out) {
  out[0] = checks[kNonFinite] == 0 ? 1.0 : 0.0;
  out[1] = __longlong_as_double(static_cast<long long>(checks[kAsymmetry]));
  out[2] = __longlong_as_double(static_cast<long long>(checks[kScale]));
  out[3] = checks[kOverlap] != 0 ? 1.0 : 0.0;
  out[kDeferredChecks] = static_cast<double>(st->count);
}

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, 4096)));
}

// ------------------------------------------------------------------------------------------------
// Driver
// ------------------------------------------------------------------------------------------------
// This thread's CUDA stream-capture mode set to thread-local for the life of the guard: another
// thread's capture in the global mode then ignores the calls made here (in the global mode a
// stream query or a synchronising copy from any thread invalidates it).
class ThreadLocalCaptureMode {
 public:
  ThreadLocalCaptureMode() { STD_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~ThreadLocalCaptureMode() { (void)cudaThreadExchangeStreamCaptureMode(&mode_); }
  ThreadLocalCaptureMode(const ThreadLocalCaptureMode&) = delete;
  ThreadLocalCaptureMode& operator=(const ThreadLocalCaptureMode&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeThreadLocal;
};

// The number of picks is read on the host at the end, and the host waits on the loop's
// progress: neither can happen while the stream is being captured. (Not "<op>: ...": this is
// no input refusal, and stays a RuntimeError in Python.)
void refuse_capture(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  STD_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  SPARD_CHECK(capture == cudaStreamCaptureStatusNone,
              "spard_ext.dpp_greedy cannot be captured in a CUDA graph (the number of picks is read on the host "
              "at the end)");
}

// Progress of the loop in mapped pinned host memory: [0] steps decided, [1] done. The device
// writes it from argmax_final; the host reads it with atomic acquire loads (no CUDA call, no
// wait). The block comes from torch's pinned-memory cache, which may hand it out again once it
// is released: unless the loop ended with the final host read (which waits for every kernel that
// writes it), the destructor waits on an event recorded behind those kernels first (an exception
// path), and if it cannot, keeps the block rather than release it under a running kernel.
class HostProgress {
 public:
  explicit HostProgress(cudaStream_t stream) : stream_(stream) {
    buffer_ = torch::stable::empty({2}, ScalarType::Long, std::nullopt,
                                   Device(torch::headeronly::DeviceType::CPU), /*pin_memory=*/true);
    torch::stable::zero_(buffer_);
    host_ = buffer_.mutable_data_ptr<int64_t>();
    void* dev = nullptr;
    if (cudaHostGetDevicePointer(&dev, host_, 0) == cudaSuccess) {
      device_ = static_cast<int64_t*>(dev);
    } else {
      (void)cudaGetLastError();  // not mapped here: no early stop, the kernels still skip their work
    }
  }
  ~HostProgress() {
    if (device_ == nullptr || !pending_) return;
    cudaEvent_t event = nullptr;
    bool waited = false;
    if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) == cudaSuccess) {
      waited = cudaEventRecord(event, stream_) == cudaSuccess && cudaEventSynchronize(event) == cudaSuccess;
      (void)cudaEventDestroy(event);
    }
    if (!waited) {
      (void)cudaGetLastError();
      new Tensor(std::move(buffer_));  // deliberately kept: a queued kernel may still write it
    }
  }
  HostProgress(const HostProgress&) = delete;
  HostProgress& operator=(const HostProgress&) = delete;

  int64_t* device() {
    if (device_ != nullptr) pending_ = true;
    return device_;
  }
  bool available() const { return device_ != nullptr; }
  int64_t steps() const { return __atomic_load_n(host_, __ATOMIC_ACQUIRE); }
  bool done() const { return __atomic_load_n(host_ + 1, __ATOMIC_ACQUIRE) != 0; }
  // Every kernel that writes the block has finished (after the final host read).
  void settled() { pending_ = false; }

 private:
  cudaStream_t stream_;
  Tensor buffer_;
  int64_t* host_ = nullptr;
  int64_t* device_ = nullptr;
  bool pending_ = false;  // kernels that write the block were launched and may still run
};

// The input checks that read the data, launched on the stream: fills `checks` (kCheckWords)
// and the item status from the masks.
template <typename T>
void launch_checks(const DppInputs& in, const T* m, int64_t cols, unsigned long long* checks, uint8_t* status,
                   cudaStream_t stream) {
  STD_CUDA_CHECK(cudaMemsetAsync(checks, 0, kCheckWords * sizeof(unsigned long long), stream));
  const int64_t total = in.n * cols;
  data_checks<T><<<grid_for(total), kThreads, 0, stream>>>(m, total, in.dense ? in.n : 0, checks);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  const uint8_t* include = in.include ? static_cast<const uint8_t*>(in.include->const_data_ptr()) : nullptr;
  const uint8_t* exclude = in.exclude ? static_cast<const uint8_t*>(in.exclude->const_data_ptr()) : nullptr;
  mask_setup<<<grid_for(in.n), kThreads, 0, stream>>>(include, exclude, in.n, status, checks);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

// Test hook: SPARD_EXT_DPP_FAULT_STEP=t makes the loop raise before enqueueing step t, with the
// earlier steps still queued (tests/test_kernels_cuda.py checks that the pinned progress block is
// not handed out again while they may still write it). Read once.
int64_t fault_step() {
  static const int64_t step = [] {
    const char* v = std::getenv("SPARD_EXT_DPP_FAULT_STEP");
    return v != nullptr ? std::strtoll(v, nullptr, 10) : int64_t{-1};
  }();
  return step;
}

struct Loop {
  Device device;
  Tensor state, slot_v, slot_i, status, checks, indices, gains;
  State* st;
  const uint8_t* include;
  int64_t n, k;
  cudaStream_t stream;
  HostProgress progress;

  template <typename T>
  Loop(const DppInputs& in, const T* m, int64_t cols, const Device& device_, cudaStream_t stream_)
      : device(device_),
        state(empty_on({static_cast<int64_t>(sizeof(State))}, ScalarType::Byte, device_)),
        slot_v(empty_on({2 * kSlots}, ScalarType::Double, device_)),
        slot_i(empty_on({2 * kSlots}, ScalarType::Long, device_)),
        status(empty_on({std::max<int64_t>(in.n, 1)}, ScalarType::Byte, device_)),
        checks(empty_on({kCheckWords}, ScalarType::Long, device_)),
        indices(empty_on({in.k}, ScalarType::Long, device_)),
        gains(empty_on({in.k}, ScalarType::Double, device_)),
        n(in.n),
        k(in.k),
        stream(stream_),
        progress(stream_) {
    st = static_cast<State*>(state.mutable_data_ptr());
    include = in.include ? static_cast<const uint8_t*>(in.include->const_data_ptr()) : nullptr;
    auto* words = static_cast<unsigned long long*>(checks.mutable_data_ptr());
    launch_checks<T>(in, m, cols, words, status.mutable_data_ptr<uint8_t>(), stream);
    init_state<<<1, kSlots, 0, stream>>>(st, words, slot_v.mutable_data_ptr<double>(),
                                         slot_i.mutable_data_ptr<int64_t>());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Whether to enqueue step t: not once the stop rule has fired; and not more than kLookahead
  // steps ahead of the device (waits on the host-mapped progress, never on a CUDA sync). While
  // it waits the thread yields for a few polls, then sleeps a little between polls: a step on
  // the device takes tens of microseconds or more, and kLookahead steps stay queued.
  bool may_launch(int64_t t) {
    SPARD_CHECK(t != fault_step(), "spard_ext.dpp_greedy: fault injected at step ", t, " (SPARD_EXT_DPP_FAULT_STEP)");
    if (!progress.available()) return true;
    for (int polls = 0;; ++polls) {
      if (progress.done()) return false;
      if (t - progress.steps() <= kLookahead) return true;
      // Nothing left on the stream (or an error, raised here): the flag is final.
      const cudaError_t idle = cudaStreamQuery(stream);
      if (idle == cudaSuccess) return !progress.done();
      if (idle != cudaErrorNotReady) STD_CUDA_CHECK(idle);
      if (polls < 8) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(polls < 64 ? 5 : 20));
      }
    }
  }

  void pick(const double* d2, int64_t t, double eps_stop) {
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kSlots, (n + kThreads - 1) / kThreads)));
    argmax_partial<<<blocks, kThreads, 0, stream>>>(d2, status.const_data_ptr<uint8_t>(), include, n, st,
                                                    slot_v.mutable_data_ptr<double>(),
                                                    slot_i.mutable_data_ptr<int64_t>());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    argmax_final<<<1, kSlots, 0, stream>>>(slot_v.const_data_ptr<double>(), slot_i.const_data_ptr<int64_t>(), st,
                                           status.mutable_data_ptr<uint8_t>(), include,
                                           indices.mutable_data_ptr<int64_t>(), gains.mutable_data_ptr<double>(), t,
                                           eps_stop, progress.device());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }

  std::tuple<Tensor, Tensor> finish(const DppInputs& in) {
    // The one host read: the deferred input checks and the number of picks, in one copy.
    Tensor result = empty_on({kDeferredChecks + 1}, ScalarType::Double, device);
    gather_result<<<1, 1, 0, stream>>>(static_cast<const unsigned long long*>(checks.const_data_ptr()), st,
                                       result.mutable_data_ptr<double>());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor host = torch::stable::to(result, Device(torch::headeronly::DeviceType::CPU));
    progress.settled();  // the copy waited for every kernel on the stream
    const double* v = host.const_data_ptr<double>();
    check_deferred(in, v);
    const auto picked = static_cast<int64_t>(v[kDeferredChecks]);
    return {torch::stable::clone(torch::stable::narrow(indices, 0, 0, picked)),
            torch::stable::clone(torch::stable::narrow(gains, 0, 0, picked))};
  }
};

// l: the dense kernel (N x N), or null with f: the factor (N x dim).
template <typename T>
std::tuple<Tensor, Tensor> cholesky_cuda(const DppInputs& in, const T* l, const T* f, int64_t dim, double eps,
                                         double eps_stop, const Device& device, cudaStream_t stream) {
  const int64_t n = in.n, k = in.k;
  Loop loop(in, l != nullptr ? l : f, l != nullptr ? n : dim, device, stream);
  Tensor d2 = empty_on({std::max<int64_t>(n, 1)}, ScalarType::Double, device);
  double* d2p = d2.mutable_data_ptr<double>();
  const bool vec = f != nullptr && rows_vectorisable(f, dim);
  if (n > 0) {
    if (l != nullptr) {
      init_diag<T><<<grid_for(n), kThreads, 0, stream>>>(l, n, d2p);
    } else {
      init_norms<T><<<warp_blocks(n), kThreads, 0, stream>>>(f, n, dim, eps, vec, d2p);
    }
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  Tensor c = empty_on({std::max<int64_t>(k, 1), std::max<int64_t>(n, 1)}, ScalarType::Double, device);
  double* cp = c.mutable_data_ptr<double>();
  const auto item_blocks = static_cast<unsigned>(std::max<int64_t>(1, (n + kItemsPerBlock - 1) / kItemsPerBlock));
  for (int64_t t = 0; t < k; ++t) {
    if (!loop.may_launch(t)) break;
    loop.pick(d2p, t, eps_stop);
    if (f != nullptr) {
      chol_row_lowrank<T><<<warp_blocks(n), kThreads, 0, stream>>>(f, n, dim, eps, vec, loop.st, cp + t * n);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
    chol_update<T><<<item_blocks, dim3(kItemsPerBlock, kPickSplit), 0, stream>>>(l, cp, n, t, loop.st, d2p);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return loop.finish(in);
}

template <typename T>
std::tuple<Tensor, Tensor> inverse_cuda(const DppInputs& in, const T* f, int64_t dim, double eps, double eps_stop,
                                        const Device& device, cudaStream_t stream) {
  const int64_t n = in.n, k = in.k;
  Loop loop(in, f, dim, device, stream);
  const bool vec = rows_vectorisable(f, dim);
  Tensor d2 = empty_on({std::max<int64_t>(n, 1)}, ScalarType::Double, device);
  double* d2p = d2.mutable_data_ptr<double>();
  if (n > 0) {
    init_norms<T><<<warp_blocks(n), kThreads, 0, stream>>>(f, n, dim, eps, vec, d2p);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t dim1 = std::max<int64_t>(dim, 1);
  Tensor a = empty_on({dim1, dim1}, ScalarType::Double, device);
  Tensor g = empty_on({dim1}, ScalarType::Double, device), u = empty_on({dim1}, ScalarType::Double, device);
  Tensor s = empty_on({1}, ScalarType::Double, device);
  double* ap = a.mutable_data_ptr<double>();
  double* gp = g.mutable_data_ptr<double>();
  double* up = u.mutable_data_ptr<double>();
  double* sp = s.mutable_data_ptr<double>();
  init_inverse<<<grid_for(dim * dim), kThreads, 0, stream>>>(ap, dim, 1.0 / eps);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  const uint8_t* status = loop.status.const_data_ptr<uint8_t>();
  const int a_blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((dim * dim + kThreads - 1) / kThreads, 4096)));
  for (int64_t t = 0; t < k; ++t) {
    if (!loop.may_launch(t)) break;
    loop.pick(d2p, t, eps_stop);
    inv_gather<T><<<warp_blocks(dim), kThreads, 0, stream>>>(ap, f, dim, loop.st, gp);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    inv_direction<T><<<1, kThreads, 0, stream>>>(gp, f, dim, loop.st, eps, up, sp);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    inv_update_a<<<a_blocks, kThreads, 0, stream>>>(ap, gp, sp, dim, loop.st);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    inv_sweep<T><<<warp_blocks(n), kThreads, 0, stream>>>(f, n, dim, vec, up, status, loop.st, d2p);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return loop.finish(in);
}

// What both entry points do after the host-side checks: the device, the capture mode and the
// refusal under capture, then `run(device, stream)`.
template <typename Run>
std::tuple<Tensor, Tensor> on_device(const Tensor& mat, const char* op, const Run& run) {
  const Device device = mat.device();
  SPARD_CHECK(device.is_cuda(), op, ": the CUDA kernels were called with a ", mat.device(), " tensor");
  const ThreadLocalCaptureMode capture_mode;
  const torch::stable::accelerator::DeviceGuard guard(device.index());
  const cudaStream_t stream = current_stream(device.index());
  refuse_capture(stream);
  return run(device, stream);
}

std::tuple<Tensor, Tensor> dpp_greedy_dense_cuda(Tensor kernel, int64_t k, double eps_stop,
                                                 std::optional<Tensor> include, std::optional<Tensor> exclude) {
  const DppInputs in = check_dpp_dense(kernel, k, eps_stop, include, exclude);
  return on_device(kernel, "dpp_greedy_dense", [&](const Device& device, cudaStream_t stream) {
    const Tensor l = as_contiguous(kernel);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      return cholesky_cuda<T>(in, l.const_data_ptr<T>(), nullptr, 0, 0.0, eps_stop, device, stream);
    };
    return l.scalar_type() == ScalarType::Float ? run(float{}) : run(double{});
  });
}

std::tuple<Tensor, Tensor> dpp_greedy_lowrank_cuda(Tensor factor, int64_t k, double eps, double eps_stop,
                                                   std::optional<Tensor> include, std::optional<Tensor> exclude,
                                                   std::string method) {
  DppMethod resolved;
  const DppInputs in = check_dpp_lowrank(factor, k, eps, eps_stop, include, exclude, method, resolved);
  return on_device(factor, "dpp_greedy_lowrank", [&](const Device& device, cudaStream_t stream) {
    const Tensor f = as_contiguous(factor);
    const int64_t dim = f.size(1);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      const T* fp = f.const_data_ptr<T>();
      if (resolved == DppMethod::kInverse) return inverse_cuda<T>(in, fp, dim, eps, eps_stop, device, stream);
      return cholesky_cuda<T>(in, nullptr, fp, dim, eps, eps_stop, device, stream);
    };
    return f.scalar_type() == ScalarType::Float ? run(float{}) : run(double{});
  });
}

}  // namespace
}  // namespace spard

STABLE_TORCH_LIBRARY_IMPL(spard_ext, CUDA, m) {
  m.impl("dpp_greedy_dense", TORCH_BOX(&spard::dpp_greedy_dense_cuda));
  m.impl("dpp_greedy_lowrank", TORCH_BOX(&spard::dpp_greedy_lowrank_cuda));
}
