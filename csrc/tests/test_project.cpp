// C++ test of the projection ops, called through the dispatcher as any libtorch program would.
// The kernels are built on the stable ABI and raise std::runtime_error on bad input. The
// autograd side of the in-place ops (version counters, the refusal of tensors that require grad)
// is registered from Python (spard_ext/_autograd.py), so a libtorch program does not get it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define EXPECT(cond)                                                     \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                      \
    }                                                                    \
  } while (0)

using ProjectFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(at::TensorList, at::TensorList, const at::Tensor&,
                                                                 double, bool);

static auto project_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("spard_ext::project_", "").typed<ProjectFn>();
}

// x <- x - clamp((<a,x> - b)/||a||², 0, cap) a, computed plainly in double.
static void check_matches_plain_loop() {
  at::manual_seed(0);
  std::vector<at::Tensor> x = {at::randn({33, 7}), at::randn({0}), at::randn({70001}).to(at::kBFloat16)};
  std::vector<at::Tensor> a = {at::randn({33, 7}), at::randn({0}), at::randn({70001})};
  std::vector<at::Tensor> x0;
  for (auto& t : x) x0.push_back(t.to(at::kDouble));
  double dot = 0, sq = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    dot += (x0[i] * a[i].to(at::kDouble)).sum().item<double>();
    sq += a[i].to(at::kDouble).square().sum().item<double>();
  }
  const double b = -2 * std::fabs(dot) - 10.0;  // numerator >= |dot| + 10: no cancellation
  const double coef = std::min(std::max((dot - b) / sq, 0.0), 1.0);
  auto [c, d, s] = project_op().call(x, a, at::scalar_tensor(b), 1.0, true);
  EXPECT(std::fabs(d.item<double>() - dot) <= 1e-4 * std::fabs(dot) + 1e-3);
  EXPECT(std::fabs(s.item<double>() - sq) <= 1e-5 * sq);
  EXPECT(std::fabs(c.item<double>() - coef) <= 1e-5 * coef);
  for (size_t i = 0; i < x.size(); ++i) {
    const auto want = x0[i] - coef * a[i].to(at::kDouble);
    const double tol = x[i].scalar_type() == at::kBFloat16 ? 2e-2 : 1e-5;
    EXPECT(at::allclose(x[i].to(at::kDouble), want, tol, tol));
  }
}

static void check_bad_input_throws() {
  std::vector<at::Tensor> x = {at::zeros({2}), at::zeros({3})};
  std::vector<at::Tensor> a = {at::zeros({2}), at::zeros({4})};
  bool threw = false;
  try {
    project_op().call(x, a, at::scalar_tensor(0.0), 1.0, false);
  } catch (const std::exception& e) {
    threw = std::string(e.what()).find("shape mismatch at index 1") != std::string::npos;
  }
  EXPECT(threw);
}

static void check_nonfinite_leaves_x() {
  std::vector<at::Tensor> x = {at::randn({16})};
  std::vector<at::Tensor> a = {at::randn({16})};
  a[0][3] = NAN;
  const auto before = x[0].clone();
  auto [c, d, s] = project_op().call(x, a, at::scalar_tensor(-1.0), INFINITY, false);
  EXPECT(c.item<float>() == 0.f);
  EXPECT(at::equal(x[0], before));
}

// A sum beyond the float32 range is the documented no-op (not a conversion error).
static void check_overflow_is_a_no_op() {
  std::vector<at::Tensor> x = {at::zeros({2})};
  std::vector<at::Tensor> a = {at::full({2}, 1.5e19)};
  auto [c, d, s] = project_op().call(x, a, at::scalar_tensor(-1.0), INFINITY, false);
  EXPECT(c.item<float>() == 0.f);
  EXPECT(std::isinf(s.item<float>()));
  EXPECT(at::equal(x[0], at::zeros({2})));
}

// The call checks every entry before writing any.
static void check_no_partial_update() {
  std::vector<at::Tensor> x = {at::randn({8}), at::randn({3})};
  std::vector<at::Tensor> a = {at::randn({8}), at::randn({3})};
  project_op().call(x, a, at::scalar_tensor(-1.0), INFINITY, false);
  const auto before = x[0].clone();
  std::vector<at::Tensor> bad_x = {x[0], at::zeros({1}).expand({3})};
  bool threw = false;
  try {
    project_op().call(bad_x, a, at::scalar_tensor(-1.0), INFINITY, false);
  } catch (const std::exception& e) {
    threw = std::string(e.what()).find("x[1] has elements that share memory") != std::string::npos;
  }
  EXPECT(threw);
  EXPECT(at::equal(x[0], before));
}

int main() {
  check_matches_plain_loop();
  check_bad_input_throws();
  check_nonfinite_leaves_x();
  check_overflow_is_a_no_op();
  check_no_partial_update();
  std::puts("test_project: all checks passed");
  return 0;
}
