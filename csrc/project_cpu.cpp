// CPU backend of the projection ops: one reduction pass and one update pass over all tensors.
//
// The flattened list is cut into fixed chunks; each chunk is one task of parallel_for and
// writes its partial sums into its own slot, which are then summed in order. The result does
// not depend on the number of threads (deterministic).
// Stable ABI (see stable.h): tensors are torch::stable::Tensor, the thread pool is torch's through
// torch::stable::parallel_for.
#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

#include "lane_sum.h"
#include "project_cpu.h"

namespace spard {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per task

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// A list as the kernels work on it: the raw data of a contiguous version of each tensor (the
// tensor itself when it is contiguous, else a contiguous copy, kept in `copies`).
struct Operands {
  std::vector<ScalarType> dtype;
  std::vector<int64_t> numel;
  std::vector<void*> data;
  std::vector<std::pair<size_t, Tensor>> copies;  // (index, contiguous copy) of non-contiguous tensors
};

Operands prepare(const std::vector<Tensor>& ts, const std::vector<Meta>& meta, bool writable) {
  Operands out;
  out.dtype.reserve(ts.size());
  out.numel.reserve(ts.size());
  out.data.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    void* data = meta[i].data;  // read by the checks
    if (!meta[i].contiguous && meta[i].numel > 0) {
      out.copies.emplace_back(i, torch::stable::contiguous(ts[i]));
      const Tensor& t = out.copies.back().second;
      data = writable ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
    }
    out.dtype.push_back(meta[i].dtype);
    out.numel.push_back(meta[i].numel);
    out.data.push_back(data);
  }
  return out;
}

// Writes the contiguous working copies back into their non-contiguous destinations.
void copy_back(const std::vector<Tensor>& dst, const Operands& work) {
  for (const auto& [i, copy] : work.copies) {
    Tensor d = dst[i];  // a handle on the same tensor
    torch::stable::copy_(d, copy);
  }
}

std::vector<Chunk> make_chunks(const Operands& xs) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(xs.numel.size()); ++t) {
    const int64_t n = xs.numel[t];
    for (int64_t s = 0; s < n; s += kChunk) chunks.push_back({t, s, std::min(n, s + kChunk)});
  }
  return chunks;
}

// The sums run in float64 for every input dtype: the products of 16/32-bit inputs are exact in
// float64, so the only rounding that matters is the final one to the float32 result (the error
// stays within that of torch.sum, where float32 lanes summing a 32k chunk lost up to 2.6e-5 on
// constant tensors). One loop per sum: two simple loops vectorise where one loop with two
// accumulator sets did not, and the chunk is still in cache for the second pass. Multi-versioned:
// AVX-512/AVX2 keep the float64 lanes ahead of memory.
template <typename tx, typename ta>
SPARD_CLONES void chunk_sums(const tx* x, const ta* a, int64_t n, bool use_dot, double& dot, double& sq) {
  sq = lane_sum<double>(n, [a](int64_t i) {
    const double v = static_cast<double>(a[i]);
    return v * v;
  });
  dot = 0;
  if (use_dot) {
    dot = lane_sum<double>(n, [x, a](int64_t i) { return static_cast<double>(x[i]) * static_cast<double>(a[i]); });
  }
}

// acc is float for 16/32-bit inputs, unless the step is beyond the float32 range (wide).
template <typename tx, typename ta, typename acc>
void chunk_update(tx* x, const ta* a, int64_t n, double coef) {
  const acc c = static_cast<acc>(coef);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<tx>(static_cast<acc>(x[i]) - c * static_cast<acc>(a[i]));
  }
}

// Sums over contiguous lists; returns (dot, sqnorm) in double.
std::pair<double, double> reduce_lists(const Operands& x, const Operands& a, bool use_dot) {
  const auto chunks = make_chunks(x);
  std::vector<double> dots(chunks.size(), 0.0), sqs(chunks.size(), 0.0);
  torch::stable::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      SPARD_DISPATCH_PAIR(x.dtype[ch.tensor], a.dtype[ch.tensor], "project_reduce", [&] {
        const tx* xp = static_cast<const tx*>(x.data[ch.tensor]) + ch.begin;
        const ta* ap = static_cast<const ta*>(a.data[ch.tensor]) + ch.begin;
        chunk_sums<tx, ta>(xp, ap, ch.end - ch.begin, use_dot, dots[c], sqs[c]);
      });
    }
  });
  double dot = 0, sq = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    dot += dots[c];
    sq += sqs[c];
  }
  return {dot, sq};
}

void update_lists(const Operands& x, const Operands& a, double coef) {
  if (coef == 0.0) return;  // nothing to do, and x stays bit-identical
  // A step beyond the float32 range (a tiny ||a||²) is applied in float64; below it, the update
  // runs in float32 with the step rounded to float32, as the CUDA kernels do.
  const bool wide = !(std::fabs(coef) <= 3.4028234663852886e38);
  const double step = wide ? coef : static_cast<double>(static_cast<float>(coef));
  const auto chunks = make_chunks(x);
  torch::stable::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      SPARD_DISPATCH_PAIR(x.dtype[ch.tensor], a.dtype[ch.tensor], "project_apply_", [&] {
        tx* xp = static_cast<tx*>(x.data[ch.tensor]) + ch.begin;
        const ta* ap = static_cast<const ta*>(a.data[ch.tensor]) + ch.begin;
        if (wide) {
          chunk_update<tx, ta, double>(xp, ap, ch.end - ch.begin, step);
        } else {
          chunk_update<tx, ta, acc_type<tx, ta>>(xp, ap, ch.end - ch.begin, step);
        }
      });
    }
  });
}

// 0-d float32 result; a value beyond the float32 range becomes ±inf (not a conversion error).
Tensor scalar_out(double v) {
  Tensor t = torch::stable::empty({}, ScalarType::Float);
  *t.mutable_data_ptr<float>() = to_float(v);
  return t;
}

// The value of a checked scalar (one element, floating, on the CPU) rounded to float32, as a double.
double as_float(const Tensor& t) {
  double v = 0;
  dispatch_float(t.scalar_type(), "as_float", [&](auto tag) {
    v = static_cast<double>(*t.const_data_ptr<decltype(tag)>());
  });
  return static_cast<double>(to_float(v));
}

std::tuple<Tensor, Tensor> project_reduce_cpu(std::vector<Tensor> x, std::vector<Tensor> a, bool use_dot) {
  std::vector<Meta> xm, am;
  check_pair_lists(x, a, "project_reduce", false, xm, am);
  const auto [dot, sq] = reduce_lists(prepare(x, xm, false), prepare(a, am, false), use_dot);
  return {scalar_out(use_dot ? dot : 0.0), scalar_out(sq)};
}

Tensor project_apply_cpu(std::vector<Tensor> x, std::vector<Tensor> a, Tensor dot, Tensor sqnorm, Tensor b,
                         double max_step, bool use_dot) {
  std::vector<Meta> xm, am;
  check_pair_lists(x, a, "project_apply_", true, xm, am);
  check_scalar(dot, "dot", "project_apply_");
  check_scalar(sqnorm, "sqnorm", "project_apply_");
  check_scalar(b, "b", "project_apply_");
  check_max_step(max_step, "project_apply_");
  const double coef = projection_coef64(as_float(dot), as_float(sqnorm), as_float(b), max_step, use_dot);
  if (coef != 0.0) {  // else x stays bit-identical, and no copy is made
    const Operands xc = prepare(x, xm, true);
    update_lists(xc, prepare(a, am, false), coef);
    copy_back(x, xc);
  }
  return scalar_out(coef);
}

std::tuple<Tensor, Tensor, Tensor> project_fused_cpu(std::vector<Tensor> x, std::vector<Tensor> a, Tensor b,
                                                     double max_step, bool use_dot) {
  std::vector<Meta> xm, am;
  check_pair_lists(x, a, "project_", true, xm, am);
  check_scalar(b, "b", "project_");
  check_max_step(max_step, "project_");
  const Operands xc = prepare(x, xm, true);
  const Operands ac = prepare(a, am, false);
  const auto [dot, sq] = reduce_lists(xc, ac, use_dot);
  const Tensor dot_t = scalar_out(use_dot ? dot : 0.0), sq_t = scalar_out(sq);
  // The coefficient is formed from the float32 values that are returned, as the split entries do.
  const double coef = projection_coef64(*dot_t.const_data_ptr<float>(), *sq_t.const_data_ptr<float>(), as_float(b),
                                        max_step, use_dot);
  update_lists(xc, ac, coef);
  copy_back(x, xc);
  return {scalar_out(coef), dot_t, sq_t};
}

}  // namespace

}  // namespace spard

STABLE_TORCH_LIBRARY_IMPL(spard_ext, CPU, m) {
  m.impl("project_reduce", TORCH_BOX(&spard::project_reduce_cpu));
  m.impl("project_apply_", TORCH_BOX(&spard::project_apply_cpu));
  m.impl("project_", TORCH_BOX(&spard::project_fused_cpu));
}
