// Greedy DPP MAP inference: schemas, input checks and the CPU backend.
//
// CPU design notes.
// - All sums are taken in fp64 whatever the input dtype (float32 or float64); the dot kernels
//   are compiled for x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and a baseline (picked at load time)
//   and use a fixed number of accumulators, so one machine gives one answer whatever the
//   thread count.
// - Small work runs on the calling thread: a parallel region per step costs more than it saves
//   below ~1e6 flops, and much more on a loaded machine.
// - Argmax ties go to the smallest index: the order (value desc, index asc) is total, so the
//   per-chunk maxima combine to the same answer however the items are chunked.
// - inverse (low-rank): gains only decrease, so a stale gain is an upper bound (lazy greedy).
//   Each item keeps the number of directions u_s already applied; a step refreshes the item
//   with the largest stale gain, then every item whose stale gain still beats it. Refreshing
//   applies the missing directions one at a time in pick order, which is bit-for-bit what an
//   eager sweep would compute, so the picks are those of the eager update. When every item
//   must be refreshed this costs one eager sweep; usually it costs far less.
// - cholesky: the eager update of the paper, vectorised across items and parallel over chunks.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "dpp.h"
#include "lane_sum.h"

namespace spard {

// ------------------------------------------------------------------------------------------------
// Input checks (shared with the CUDA backend; none reads a device value on the host)
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
  if (method == "cholesky") {
    resolved = DppMethod::kCholesky;
  } else if (method == "inverse") {
    resolved = DppMethod::kInverse;
  } else {
    // Per pick both pay N·D for the kernel row (or its direction); cholesky adds N·t for the
    // update and N·k memory, inverse adds D² for the update of A.
    const double d = static_cast<double>(factor.size(1));
    const bool inverse_cheaper = d * d <= 0.5 * static_cast<double>(in.n) * std::max<int64_t>(in.k, 1);
    resolved = (eps > 0 && inverse_cheaper) ? DppMethod::kInverse : DppMethod::kCholesky;
  }
  return in;
}

// ------------------------------------------------------------------------------------------------
// CPU kernels
// ------------------------------------------------------------------------------------------------
namespace detail {

// fp64 dot products with a fixed accumulation order (lane_sum), one multi-versioned function
// per pair of input types.
SPARD_CLONES double dot_df(const double* u, const float* f, int64_t n) {
  return lane_sum<double>(n, [u, f](int64_t i) { return u[i] * static_cast<double>(f[i]); });
}

SPARD_CLONES double dot_dd(const double* u, const double* f, int64_t n) {
  return lane_sum<double>(n, [u, f](int64_t i) { return u[i] * f[i]; });
}

// Dot of two input rows (same dtype), in fp64.
SPARD_CLONES double dot_ff(const float* a, const float* b, int64_t n) {
  return lane_sum<double>(n, [a, b](int64_t i) { return static_cast<double>(a[i]) * static_cast<double>(b[i]); });
}

// y[i] -= c * x[i] over a range (the Cholesky update, vectorised across items).
SPARD_CLONES void axpy_neg(double* y, const double* x, double c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] -= c * x[i];
}

}  // namespace detail

namespace {

inline double dot_u(const double* u, const float* f, int64_t n) { return detail::dot_df(u, f, n); }
inline double dot_u(const double* u, const double* f, int64_t n) { return detail::dot_dd(u, f, n); }
inline double dot_rows(const float* a, const float* b, int64_t n) { return detail::dot_ff(a, b, n); }
inline double dot_rows(const double* a, const double* b, int64_t n) { return detail::dot_dd(a, b, n); }

constexpr int64_t kGrain = 1 << 15;       // items per parallel task of a scan
constexpr double kParallelFlops = 1e6;    // below this, a step's work stays on one thread
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

// Candidate of an argmax: larger value first, then smaller index. NaN never wins.
struct Best {
  double v = -std::numeric_limits<double>::infinity();
  int64_t i = kNone;
};
inline bool beats(double v, int64_t i, const Best& b) { return v > b.v || (v == b.v && i < b.i); }

// Item status.
constexpr uint8_t kFree = 0, kPicked = 1, kBarred = 2;

// Which items the next pick may come from: the included ones while any is left, then all.
struct Pool {
  const uint8_t* status;
  const uint8_t* include;
  bool include_phase;
  bool has(int64_t i) const { return status[i] == kFree && (!include_phase || include[i]); }
};

int64_t n_chunks(int64_t n) { return (n + kGrain - 1) / kGrain; }

// Deterministic parallel argmax of value(i) over the pool.
template <typename F>
Best pool_argmax(const Pool& pool, int64_t n, std::vector<Best>& slots, const F& value) {
  const int64_t chunks = n_chunks(n);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      Best b;
      const int64_t end = std::min(n, (c + 1) * kGrain);
      for (int64_t i = c * kGrain; i < end; ++i) {
        if (pool.has(i)) {
          const double v = value(i);
          if (beats(v, i, b)) b = {v, i};
        }
      }
      slots[c] = b;
    }
  });
  Best best;
  for (int64_t c = 0; c < chunks; ++c) {
    if (slots[c].i != kNone && (best.i == kNone || beats(slots[c].v, slots[c].i, best))) best = slots[c];
  }
  return best;
}

// Stop rule: the best gain must be >= eps_stop and > 0 (a zero gain would make log det -inf).
inline bool stops(double gain, double eps_stop) { return !(gain >= eps_stop && gain > 0); }

struct Output {
  at::Tensor indices, gains;
  int64_t* idx;
  double* gain;
  explicit Output(int64_t k)
      : indices(at::empty({k}, at::kLong)), gains(at::empty({k}, at::kDouble)),
        idx(indices.mutable_data_ptr<int64_t>()), gain(gains.mutable_data_ptr<double>()) {}
  std::tuple<at::Tensor, at::Tensor> finish(int64_t picked) {
    return {indices.narrow(0, 0, picked).clone(), gains.narrow(0, 0, picked).clone()};
  }
};

struct Masks {
  std::vector<uint8_t> status;
  const uint8_t* include;
  int64_t include_left = 0;
  Masks(const DppInputs& in) : status(in.n, kFree), include(in.include.const_data_ptr<uint8_t>()) {
    const uint8_t* ex = in.exclude.const_data_ptr<uint8_t>();
    for (int64_t i = 0; i < in.n; ++i) {
      if (ex[i]) status[i] = kBarred;
      include_left += include[i] ? 1 : 0;
    }
  }
  Pool pool() const { return Pool{status.data(), include, include_left > 0}; }
  void pick(int64_t j) {
    status[j] = kPicked;
    if (include[j]) --include_left;
  }
};

// ---------------------------------------------------------------------------------------------
// Incremental Cholesky (dense kernel, or kernel rows F f_j + eps·e_j from a factor).
// row(j, lo, hi, out) writes L[j, lo:hi] as fp64 into out.
// ---------------------------------------------------------------------------------------------
// row_cost: flops per entry of a kernel row (1 for a dense kernel, D for a factor).
constexpr int64_t kRowBlock = 1024;  // items per task: the block of e stays in L1/L2
template <typename Row>
std::tuple<at::Tensor, at::Tensor> greedy_cholesky(const DppInputs& in, double eps_stop, at::Tensor d2_t,
                                                   int64_t row_cost, const Row& row) {
  const int64_t n = in.n, k = in.k;
  Output out(k);
  Masks masks(in);
  double* d2 = d2_t.mutable_data_ptr<double>();
  at::Tensor c_t = at::empty({std::max<int64_t>(k, 1), std::max<int64_t>(n, 1)}, at::kDouble);
  double* c = c_t.mutable_data_ptr<double>();
  std::vector<double> cj(std::max<int64_t>(k, 1));
  std::vector<Best> slots(n_chunks(n));
  int64_t t = 0;
  for (; t < k; ++t) {
    const Pool pool = masks.pool();
    const Best best = pool_argmax(pool, n, slots, [&](int64_t i) { return d2[i]; });
    if (best.i == kNone || stops(best.v, eps_stop)) break;
    const int64_t j = best.i;
    out.idx[t] = j;
    out.gain[t] = best.v;
    masks.pick(j);
    for (int64_t s = 0; s < t; ++s) cj[s] = c[s * n + j];
    const double dj = std::sqrt(best.v);
    double* e = c + t * n;
    const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
    const double work = static_cast<double>(n) * static_cast<double>(t + row_cost);
    at::parallel_for(0, blocks, work > kParallelFlops ? 1 : blocks, [&](int64_t lo_b, int64_t hi_b) {
      for (int64_t blk = lo_b; blk < hi_b; ++blk) {
        const int64_t lo = blk * kRowBlock, len = std::min(n, lo + kRowBlock) - lo;
        row(j, lo, lo + len, e + lo);
        for (int64_t s = 0; s < t; ++s) detail::axpy_neg(e + lo, c + s * n + lo, cj[s], len);
        for (int64_t i = lo; i < lo + len; ++i) {
          e[i] /= dj;
          d2[i] -= e[i] * e[i];
        }
      }
    });
  }
  return out.finish(t);
}

// ---------------------------------------------------------------------------------------------
// Inverse update with lazy refresh (low-rank only).
// ---------------------------------------------------------------------------------------------
template <typename T>
std::tuple<at::Tensor, at::Tensor> greedy_inverse(const DppInputs& in, const at::Tensor& factor, double eps,
                                                  double eps_stop) {
  const int64_t n = in.n, k = in.k, dim = factor.size(1);
  const T* f = factor.const_data_ptr<T>();
  Output out(k);
  Masks masks(in);
  std::vector<double> d2(n);
  std::vector<int32_t> applied(n, 0);  // directions u_0.. already subtracted from d2[i]
  at::Tensor a_t = at::eye(dim, at::kDouble).div_(eps);
  double* a = a_t.mutable_data_ptr<double>();
  std::vector<double> u(std::max<int64_t>(k, 1) * std::max<int64_t>(dim, 1));
  std::vector<double> g(std::max<int64_t>(dim, 1));
  std::vector<Best> slots(n_chunks(n));

  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) d2[i] = eps + dot_rows(f + i * dim, f + i * dim, dim);
  });
  auto refresh = [&](int64_t i, int32_t t) {
    double v = d2[i];
    const T* fi = f + i * dim;
    for (int32_t s = applied[i]; s < t; ++s) {
      const double w = dot_u(u.data() + s * dim, fi, dim);
      v -= w * w;
    }
    d2[i] = v;
    applied[i] = t;
  };

  std::vector<int64_t> todo(std::max<int64_t>(n, 1));
  const bool parallel_update = static_cast<double>(dim) * dim > kParallelFlops;
  int64_t t = 0;
  for (; t < k; ++t) {
    const int32_t ti = static_cast<int32_t>(t);
    const Pool pool = masks.pool();
    // 1. the largest stale gain, made exact.
    Best best = pool_argmax(pool, n, slots, [&](int64_t i) { return d2[i]; });
    if (best.i == kNone) break;
    refresh(best.i, ti);
    best.v = d2[best.i];
    // 2. every other item whose stale gain (an upper bound) still beats it; none of the rest can.
    int64_t n_todo = 0;
    double work = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (applied[i] < ti && pool.has(i) && beats(d2[i], i, best)) {
        todo[n_todo++] = i;
        work += ti - applied[i];
      }
    }
    work *= static_cast<double>(dim);
    const int64_t grain = work > kParallelFlops ? std::max<int64_t>(1, n_todo / 64) : std::max<int64_t>(n_todo, 1);
    at::parallel_for(0, n_todo, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) refresh(todo[q], ti);
    });
    for (int64_t q = 0; q < n_todo; ++q) {
      if (beats(d2[todo[q]], todo[q], best)) best = {d2[todo[q]], todo[q]};
    }
    if (stops(best.v, eps_stop)) break;
    const int64_t j = best.i;
    out.idx[t] = j;
    out.gain[t] = best.v;
    masks.pick(j);
    // 3. A f_j, s = 1 + f_jᵀ A f_j, u_t = sqrt(eps / s)·A f_j, A -= (A f_j)(A f_j)ᵀ / s.
    const T* fj = f + j * dim;
    const int64_t rows_grain = parallel_update ? 16 : std::max<int64_t>(dim, 1);
    at::parallel_for(0, dim, rows_grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) g[r] = dot_u(a + r * dim, fj, dim);
    });
    const double s = 1.0 + dot_u(g.data(), fj, dim);
    const double scale = std::sqrt(eps / s);
    double* ut = u.data() + t * dim;
    for (int64_t r = 0; r < dim; ++r) ut[r] = scale * g[r];
    at::parallel_for(0, dim, rows_grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) detail::axpy_neg(a + r * dim, g.data(), g[r] / s, dim);
    });
  }
  return out.finish(t);
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_dense_cpu(const at::Tensor& kernel, int64_t k, double eps_stop,
                                                        const std::optional<at::Tensor>& include,
                                                        const std::optional<at::Tensor>& exclude) {
  const DppInputs in = check_dpp_dense(kernel, k, eps_stop, include, exclude);
  check_deferred(in, in.deferred.const_data_ptr<double>());
  const at::Tensor l = kernel.contiguous();
  const int64_t n = in.n;
  at::Tensor d2 = l.diagonal().to(at::kDouble).clone(at::MemoryFormat::Contiguous);  // never a view of L
  return AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "dpp_greedy_dense", [&] {
    const scalar_t* lp = l.const_data_ptr<scalar_t>();
    // Row j of L (symmetric, so row j is column j), as fp64.
    auto row = [&](int64_t j, int64_t lo, int64_t hi, double* dst) {
      const scalar_t* src = lp + j * n;
      for (int64_t i = lo; i < hi; ++i) dst[i - lo] = static_cast<double>(src[i]);
    };
    return greedy_cholesky(in, eps_stop, d2, 1, row);
  });
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_lowrank_cpu(const at::Tensor& factor, int64_t k, double eps,
                                                          double eps_stop,
                                                          const std::optional<at::Tensor>& include,
                                                          const std::optional<at::Tensor>& exclude,
                                                          c10::string_view method) {
  DppMethod resolved;
  const DppInputs in = check_dpp_lowrank(factor, k, eps, eps_stop, include, exclude, std::string(method), resolved);
  check_deferred(in, in.deferred.const_data_ptr<double>());
  const at::Tensor f = factor.contiguous();
  const int64_t n = in.n, dim = f.size(1);
  return AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "dpp_greedy_lowrank", [&] {
    if (resolved == DppMethod::kInverse) return greedy_inverse<scalar_t>(in, f, eps, eps_stop);
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    at::Tensor d2 = at::empty({n}, at::kDouble);
    double* d2p = d2.mutable_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) d2p[i] = eps + dot_rows(fp + i * dim, fp + i * dim, dim);
    // Row j of F Fᵀ + eps·I, as fp64.
    auto row = [&](int64_t j, int64_t lo, int64_t hi, double* dst) {
      const scalar_t* fj = fp + j * dim;
      for (int64_t i = lo; i < hi; ++i) dst[i - lo] = dot_rows(fj, fp + i * dim, dim) + (i == j ? eps : 0.0);
    };
    return greedy_cholesky(in, eps_stop, d2, dim, row);
  });
}

}  // namespace
}  // namespace spard

TORCH_LIBRARY_FRAGMENT(spard_ext, m) {
  m.def(
      "dpp_greedy_dense(Tensor kernel, int k, float eps_stop, Tensor? include, Tensor? exclude) "
      "-> (Tensor indices, Tensor gains)");
  m.def(
      "dpp_greedy_lowrank(Tensor factor, int k, float eps, float eps_stop, Tensor? include, "
      "Tensor? exclude, str method) -> (Tensor indices, Tensor gains)");
}

TORCH_LIBRARY_IMPL(spard_ext, CPU, m) {
  m.impl("dpp_greedy_dense", &spard::dpp_greedy_dense_cpu);
  m.impl("dpp_greedy_lowrank", &spard::dpp_greedy_lowrank_cpu);
}
