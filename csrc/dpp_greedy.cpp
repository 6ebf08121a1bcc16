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
//
// Stable ABI (see stable.h): the kernels work on the raw data of contiguous inputs, with torch's
// thread pool through torch::stable::parallel_for.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dpp_method.h"
#include "lane_sum.h"
#include "stable.h"

namespace spard {

// ------------------------------------------------------------------------------------------------
// Input checks (the CUDA kernels check the same things with the same messages, cuda/checks.cpp)
// ------------------------------------------------------------------------------------------------
namespace {

// Validated inputs: masks as 0/1 bytes of length N.
struct DppInputs {
  int64_t n = 0;
  int64_t k = 0;  // min(k, N)
  std::vector<uint8_t> include;  // all zero when not given
  std::vector<uint8_t> exclude;  // all zero when not given
};

void check_float_matrix(const Tensor& t, const char* name, const char* op) {
  SPARD_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D tensor, got shape ", t.sizes());
  SPARD_CHECK(t.scalar_type() == ScalarType::Float || t.scalar_type() == ScalarType::Double, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

std::vector<uint8_t> mask_or_zeros(const std::optional<Tensor>& m, const char* name, int64_t n, const Tensor& like,
                                   const char* op) {
  std::vector<uint8_t> out(n, 0);
  if (!m.has_value()) return out;
  const Tensor& t = *m;
  SPARD_CHECK(t.scalar_type() == ScalarType::Bool, op, ": ", name, " must be a bool mask, got ", t.scalar_type());
  SPARD_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be a 1-D mask of length N = ", n,
              ", got shape ", t.sizes());
  SPARD_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), " like the kernel, got ",
              t.device());
  const Tensor c = as_contiguous(t);
  const bool* p = c.const_data_ptr<bool>();
  for (int64_t i = 0; i < n; ++i) out[i] = p[i] ? 1 : 0;
  return out;
}

DppInputs check_common(const Tensor& mat, int64_t k, double eps_stop, const std::optional<Tensor>& include,
                       const std::optional<Tensor>& exclude, const char* op) {
  SPARD_CHECK(k >= 0, op, ": k must be >= 0, got ", k);
  SPARD_CHECK(!std::isnan(eps_stop), op, ": eps_stop must not be NaN");
  DppInputs in;
  in.n = mat.size(0);
  in.k = std::min<int64_t>(k, in.n);
  in.include = mask_or_zeros(include, "include", in.n, mat, op);
  in.exclude = mask_or_zeros(exclude, "exclude", in.n, mat, op);
  return in;
}

// The checks that read the data, on the contiguous input m (n x d): finite entries, for a dense
// kernel symmetry up to rounding (|L - Lᵀ| in the input's dtype, against max |L|), disjoint masks.
template <typename T>
void check_data(const DppInputs& in, const T* m, int64_t d, bool dense, const char* op, const char* name) {
  const int64_t n = in.n;
  // All finite, and max |entry|: per chunk of entries, then combined (order-free, deterministic).
  constexpr int64_t kChunk = 1 << 16;
  const int64_t total = n * d;
  const int64_t chunks = std::max<int64_t>((total + kChunk - 1) / kChunk, 1);
  std::vector<double> chunk_scale(chunks, 0.0);
  std::vector<uint8_t> chunk_finite(chunks, 1);
  torch::stable::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      double mx = 0;
      bool ok = true;
      for (int64_t i = c * kChunk; i < std::min(total, (c + 1) * kChunk); ++i) {
        const double v = static_cast<double>(m[i]);
        ok &= (v - v == 0.0);  // false for NaN and ±inf
        mx = std::max(mx, std::fabs(v));
      }
      chunk_scale[c] = mx;
      chunk_finite[c] = ok;
    }
  });
  const bool finite = std::all_of(chunk_finite.begin(), chunk_finite.end(), [](uint8_t f) { return f != 0; });
  const double scale = *std::max_element(chunk_scale.begin(), chunk_scale.end());
  SPARD_CHECK(finite, op, ": ", name, " must be finite (it holds NaN or Inf)");
  if (dense) {
    // max |L[i, j] - L[j, i]| over 64 x 64 tiles (both stay in cache), a band of rows per task;
    // a maximum does not depend on the order, so the result is the same for any thread count.
    constexpr int64_t kTile = 64;
    const int64_t bands = (n + kTile - 1) / kTile;
    std::vector<double> band_max(std::max<int64_t>(bands, 1), 0.0);
    const double work = static_cast<double>(n) * static_cast<double>(n);
    torch::stable::parallel_for(0, bands, work > 1e6 ? 1 : std::max<int64_t>(bands, 1), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        double mx = 0;
        const int64_t i0 = b * kTile, i1 = std::min(n, i0 + kTile);
        for (int64_t j0 = i0; j0 < n; j0 += kTile) {
          const int64_t j1 = std::min(n, j0 + kTile);
          for (int64_t i = i0; i < i1; ++i) {
            for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
              const T diff = m[i * n + j] - m[j * n + i];
              mx = std::max(mx, std::fabs(static_cast<double>(diff)));
            }
          }
        }
        band_max[b] = mx;
      }
    });
    const double asym = *std::max_element(band_max.begin(), band_max.end());
    // Symmetric up to rounding: a kernel built as F·Fᵀ in float32 passes, a wrong matrix does not.
    const double tol = (std::is_same_v<T, float> ? 1e-5 : 1e-10) * std::max(scale, 1e-30);
    SPARD_CHECK(asym <= tol, op, ": kernel must be symmetric, max |L - Lᵀ| = ", asym, " (tolerance ", tol, ")");
  }
  bool overlap = false;
  for (int64_t i = 0; i < n; ++i) overlap = overlap || (in.include[i] && in.exclude[i]);
  SPARD_CHECK(!overlap, op, ": include and exclude must not share an item");
}

DppInputs check_dpp_dense(const Tensor& kernel, int64_t k, double eps_stop, const std::optional<Tensor>& include,
                          const std::optional<Tensor>& exclude) {
  const char* op = "dpp_greedy_dense";
  check_float_matrix(kernel, "kernel", op);
  SPARD_CHECK(kernel.size(0) == kernel.size(1), op, ": kernel must be square (N x N), got shape ", kernel.sizes());
  return check_common(kernel, k, eps_stop, include, exclude, op);
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
  DppInputs in = check_common(factor, k, eps_stop, include, exclude, op);
  resolved = resolve_dpp_method(method, eps, in.n, factor.size(1), in.k);
  return in;
}

}  // namespace

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
  torch::stable::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
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
  Tensor indices, gains;
  int64_t* idx;
  double* gain;
  explicit Output(int64_t k)
      : indices(torch::stable::empty({k}, ScalarType::Long)), gains(torch::stable::empty({k}, ScalarType::Double)),
        idx(indices.mutable_data_ptr<int64_t>()), gain(gains.mutable_data_ptr<double>()) {}
  std::tuple<Tensor, Tensor> finish(int64_t picked) {
    return {torch::stable::clone(torch::stable::narrow(indices, 0, 0, picked)),
            torch::stable::clone(torch::stable::narrow(gains, 0, 0, picked))};
  }
};

struct Masks {
  std::vector<uint8_t> status;
  const uint8_t* include;
  int64_t include_left = 0;
  Masks(const DppInputs& in) : status(in.n, kFree), include(in.include.data()) {
    const uint8_t* ex = in.exclude.data();
    for (int64_t i = 0; i < in.n; ++i) {
      if (ex[i]) status[i] = kBarred;
      include_left += include[i] ? 1 : 0;
    }
  }
  Pool pool() const { return Pool{status.data(), include, include_left > 0}; }
  // The best included item fails the stop rule: so do the other included items (their gains
  // are no larger and only decrease), so the include phase ends and the picks go on over all
  // items instead of ending the selection.
  void end_include_phase() { include_left = 0; }
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
std::tuple<Tensor, Tensor> greedy_cholesky(const DppInputs& in, double eps_stop, std::vector<double>& d2_v,
                                           int64_t row_cost, const Row& row) {
  const int64_t n = in.n, k = in.k;
  Output out(k);
  Masks masks(in);
  double* d2 = d2_v.data();
  // k x n rows of the Cholesky factor, left uninitialised (each row is written before it is read).
  const std::unique_ptr<double[]> c_buf(new double[std::max<int64_t>(k, 1) * std::max<int64_t>(n, 1)]);
  double* c = c_buf.get();
  std::vector<double> cj(std::max<int64_t>(k, 1));
  std::vector<Best> slots(n_chunks(n));
  int64_t t = 0;
  for (; t < k; ++t) {
    const Pool pool = masks.pool();
    const Best best = pool_argmax(pool, n, slots, [&](int64_t i) { return d2[i]; });
    if (best.i != kNone && pool.include_phase && stops(best.v, eps_stop)) {
      masks.end_include_phase();
      --t;  // this step again, over all items
      continue;
    }
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
    torch::stable::parallel_for(0, blocks, work > kParallelFlops ? 1 : blocks, [&](int64_t lo_b, int64_t hi_b) {
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
std::tuple<Tensor, Tensor> greedy_inverse(const DppInputs& in, const Tensor& factor, double eps, double eps_stop) {
  const int64_t n = in.n, k = in.k, dim = factor.size(1);
  const T* f = factor.const_data_ptr<T>();
  Output out(k);
  Masks masks(in);
  std::vector<double> d2(n);
  std::vector<int32_t> applied(n, 0);  // directions u_0.. already subtracted from d2[i]
  // A = (I - Σ_s u_s u_sᵀ) / eps, kept implicit (A f = (f - Σ_s u_s (u_sᵀ f)) / eps, 2 t D per
  // pick) while that costs less than the D x D matrix (2 D² per pick), i.e. for the first D
  // picks, then built once and updated in place (A -= g gᵀ / s).
  std::vector<double> a_v;
  double* a = nullptr;
  std::vector<double> u(std::max<int64_t>(k, 1) * std::max<int64_t>(dim, 1));
  std::vector<double> w(std::max<int64_t>(k, 1));
  std::vector<double> g(std::max<int64_t>(dim, 1));
  std::vector<Best> slots(n_chunks(n));

  torch::stable::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
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
    torch::stable::parallel_for(0, n_todo, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) refresh(todo[q], ti);
    });
    for (int64_t q = 0; q < n_todo; ++q) {
      if (beats(d2[todo[q]], todo[q], best)) best = {d2[todo[q]], todo[q]};
    }
    if (pool.include_phase && stops(best.v, eps_stop)) {
      masks.end_include_phase();
      --t;  // this step again, over all items
      continue;
    }
    if (stops(best.v, eps_stop)) break;
    const int64_t j = best.i;
    out.idx[t] = j;
    out.gain[t] = best.v;
    masks.pick(j);
    // 3. A f_j, s = 1 + f_jᵀ A f_j, u_t = sqrt(eps / s)·A f_j, A -= (A f_j)(A f_j)ᵀ / s.
    const T* fj = f + j * dim;
    const int64_t rows_grain = parallel_update ? 16 : std::max<int64_t>(dim, 1);
    if (a == nullptr && t >= dim) {  // from here on the matrix is cheaper: build it once
      a_v.assign(dim * dim, 0.0);
      a = a_v.data();
      torch::stable::parallel_for(0, dim, rows_grain, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          double* ar = a + r * dim;
          for (int64_t s = 0; s < t; ++s) detail::axpy_neg(ar, u.data() + s * dim, u[s * dim + r], dim);
          ar[r] += 1.0;
          for (int64_t c = 0; c < dim; ++c) ar[c] /= eps;
        }
      });
    }
    if (a == nullptr) {  // g = (f_j - Σ_s u_s (u_sᵀ f_j)) / eps
      for (int64_t r = 0; r < dim; ++r) g[r] = static_cast<double>(fj[r]);
      for (int64_t s = 0; s < t; ++s) w[s] = dot_u(u.data() + s * dim, fj, dim);
      for (int64_t s = 0; s < t; ++s) detail::axpy_neg(g.data(), u.data() + s * dim, w[s], dim);
      for (int64_t r = 0; r < dim; ++r) g[r] /= eps;
    } else {
      torch::stable::parallel_for(0, dim, rows_grain, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) g[r] = dot_u(a + r * dim, fj, dim);
      });
    }
    const double s = 1.0 + dot_u(g.data(), fj, dim);
    const double scale = std::sqrt(eps / s);
    double* ut = u.data() + t * dim;
    for (int64_t r = 0; r < dim; ++r) ut[r] = scale * g[r];
    if (a != nullptr) {
      torch::stable::parallel_for(0, dim, rows_grain, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) detail::axpy_neg(a + r * dim, g.data(), g[r] / s, dim);
      });
    }
  }
  return out.finish(t);
}

std::tuple<Tensor, Tensor> dpp_greedy_dense_cpu(Tensor kernel, int64_t k, double eps_stop,
                                                std::optional<Tensor> include, std::optional<Tensor> exclude) {
  const DppInputs in = check_dpp_dense(kernel, k, eps_stop, include, exclude);
  const Tensor l = as_contiguous(kernel);
  const int64_t n = in.n;
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* lp = l.const_data_ptr<scalar_t>();
    check_data(in, lp, n, true, "dpp_greedy_dense", "kernel");
    std::vector<double> d2(n);
    for (int64_t i = 0; i < n; ++i) d2[i] = static_cast<double>(lp[i * n + i]);
    // Row j of L (symmetric, so row j is column j), as fp64.
    auto row = [&](int64_t j, int64_t lo, int64_t hi, double* dst) {
      const scalar_t* src = lp + j * n;
      for (int64_t i = lo; i < hi; ++i) dst[i - lo] = static_cast<double>(src[i]);
    };
    return greedy_cholesky(in, eps_stop, d2, 1, row);
  };
  return l.scalar_type() == ScalarType::Float ? run(float{}) : run(double{});
}

std::tuple<Tensor, Tensor> dpp_greedy_lowrank_cpu(Tensor factor, int64_t k, double eps, double eps_stop,
                                                  std::optional<Tensor> include, std::optional<Tensor> exclude,
                                                  std::string method) {
  DppMethod resolved;
  const DppInputs in = check_dpp_lowrank(factor, k, eps, eps_stop, include, exclude, method, resolved);
  const Tensor f = as_contiguous(factor);
  const int64_t n = in.n, dim = f.size(1);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    check_data(in, fp, dim, false, "dpp_greedy_lowrank", "factor");
    if (resolved == DppMethod::kInverse) return greedy_inverse<scalar_t>(in, f, eps, eps_stop);
    std::vector<double> d2(n);
    for (int64_t i = 0; i < n; ++i) d2[i] = eps + dot_rows(fp + i * dim, fp + i * dim, dim);
    // Row j of F Fᵀ + eps·I, as fp64.
    auto row = [&](int64_t j, int64_t lo, int64_t hi, double* dst) {
      const scalar_t* fj = fp + j * dim;
      for (int64_t i = lo; i < hi; ++i) dst[i - lo] = dot_rows(fj, fp + i * dim, dim) + (i == j ? eps : 0.0);
    };
    return greedy_cholesky(in, eps_stop, d2, dim, row);
  };
  return f.scalar_type() == ScalarType::Float ? run(float{}) : run(double{});
}

}  // namespace
}  // namespace spard

STABLE_TORCH_LIBRARY_FRAGMENT(spard_ext, m) {
  m.def(
      "dpp_greedy_dense(Tensor kernel, int k, float eps_stop, Tensor? include, Tensor? exclude) "
      "-> (Tensor indices, Tensor gains)");
  m.def(
      "dpp_greedy_lowrank(Tensor factor, int k, float eps, float eps_stop, Tensor? include, "
      "Tensor? exclude, str method) -> (Tensor indices, Tensor gains)");
}

STABLE_TORCH_LIBRARY_IMPL(spard_ext, CPU, m) {
  m.impl("dpp_greedy_dense", TORCH_BOX(&spard::dpp_greedy_dense_cpu));
  m.impl("dpp_greedy_lowrank", TORCH_BOX(&spard::dpp_greedy_lowrank_cpu));
}
