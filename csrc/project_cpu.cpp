// CPU backend of the projection ops: one reduction pass and one update pass over all tensors.
//
// The flattened list is cut into fixed chunks; each chunk is one task of at::parallel_for and
// writes its partial sums into its own slot, which are then summed in order. The result does
// not depend on the number of threads (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lane_sum.h"
#include "project.h"

namespace spard {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per task

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(const std::vector<at::Tensor>& xs) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(xs.size()); ++t) {
    const int64_t n = xs[t].numel();
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

template <typename tx, typename ta>
void chunk_update(tx* x, const ta* a, int64_t n, float coef) {
  using acc = acc_type<tx, ta>;
  const acc c = coef;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<tx>(static_cast<acc>(x[i]) - c * static_cast<acc>(a[i]));
  }
}

// Sums over contiguous lists; returns (dot, sqnorm) in double.
std::pair<double, double> reduce_lists(const std::vector<at::Tensor>& x, const std::vector<at::Tensor>& a,
                                       bool use_dot) {
  const auto chunks = make_chunks(x);
  std::vector<double> dots(chunks.size(), 0.0), sqs(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& xt = x[ch.tensor];
      const at::Tensor& at_ = a[ch.tensor];
      SPARD_DISPATCH_PAIR(xt.scalar_type(), at_.scalar_type(), "project_reduce", [&] {
        const tx* xp = xt.const_data_ptr<tx>() + ch.begin;
        const ta* ap = at_.const_data_ptr<ta>() + ch.begin;
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

void update_lists(std::vector<at::Tensor>& x, const std::vector<at::Tensor>& a, float coef) {
  if (coef == 0.f) return;  // nothing to do, and x stays bit-identical
  const auto chunks = make_chunks(x);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      at::Tensor& xt = x[ch.tensor];
      const at::Tensor& at_ = a[ch.tensor];
      SPARD_DISPATCH_PAIR(xt.scalar_type(), at_.scalar_type(), "project_apply_", [&] {
        chunk_update<tx, ta>(xt.mutable_data_ptr<tx>() + ch.begin, at_.const_data_ptr<ta>() + ch.begin,
                             ch.end - ch.begin, coef);
      });
    }
  });
}

// 0-d float32 result; a value beyond the float32 range becomes ±inf (not a conversion error).
at::Tensor scalar_out(double v) {
  at::Tensor t = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *t.mutable_data_ptr<float>() = to_float(v);
  return t;
}

float as_float(const at::Tensor& t) { return to_float(t.item<double>()); }

std::tuple<at::Tensor, at::Tensor> project_reduce_cpu(at::TensorList x, at::TensorList a, bool use_dot) {
  check_pair_lists(x, a, "project_reduce", false);
  const auto [dot, sq] = reduce_lists(contiguous_list(x), contiguous_list(a), use_dot);
  return {scalar_out(use_dot ? dot : 0.0), scalar_out(sq)};
}

at::Tensor project_apply_cpu(at::TensorList x, at::TensorList a, const at::Tensor& dot,
                             const at::Tensor& sqnorm, const at::Tensor& b, double max_step,
                             bool use_dot) {
  check_pair_lists(x, a, "project_apply_", true);
  const at::Device cpu(at::kCPU);
  check_scalar(dot, "dot", "project_apply_", cpu);
  check_scalar(sqnorm, "sqnorm", "project_apply_", cpu);
  check_scalar(b, "b", "project_apply_", cpu);
  check_max_step(max_step, "project_apply_");
  const float coef = projection_coef(as_float(dot), as_float(sqnorm), as_float(b),
                                     to_float(max_step), use_dot);
  auto xc = contiguous_list(x);
  update_lists(xc, contiguous_list(a), coef);
  copy_back(x, xc);
  return scalar_out(coef);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> project_fused_cpu(at::TensorList x, at::TensorList a,
                                                                 const at::Tensor& b, double max_step,
                                                                 bool use_dot) {
  check_pair_lists(x, a, "project_", true);
  check_scalar(b, "b", "project_", at::Device(at::kCPU));
  check_max_step(max_step, "project_");
  auto xc = contiguous_list(x);
  const auto ac = contiguous_list(a);
  const auto [dot, sq] = reduce_lists(xc, ac, use_dot);
  const at::Tensor dot_t = scalar_out(use_dot ? dot : 0.0), sq_t = scalar_out(sq);
  // The coefficient is formed from the float32 values that are returned, as the split entries do.
  const float coef = projection_coef(dot_t.item<float>(), sq_t.item<float>(), as_float(b),
                                     to_float(max_step), use_dot);
  update_lists(xc, ac, coef);
  copy_back(x, xc);
  return {scalar_out(coef), dot_t, sq_t};
}

}  // namespace

}  // namespace spard

TORCH_LIBRARY_IMPL(spard_ext, CPU, m) {
  m.impl("project_reduce", &spard::project_reduce_cpu);
  m.impl("project_apply_", &spard::project_apply_cpu);
  m.impl("project_", &spard::project_fused_cpu);
}
