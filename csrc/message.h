// Error messages built without iostreams, and the checks that raise them.
//
// Why: a toolchain that links parts of libstdc++ statically into the extension (gcc-toolset /
// devtoolset style) leaves the process with two copies of the stream and locale machinery. On
// such a build (seen on an H100 machine) c10::str's std::ostringstream, inlined here, picked a
// facet of the other copy: formatting a number crashed with SIGSEGV instead of raising the
// error. std::string, std::to_string and snprintf do not touch the locale machinery. (The
// stable ABI's STD_TORCH_CHECK formats with an ostringstream too, so it is not used either.)
//
// Both libraries include this header, and both are built on the LibTorch stable ABI
// (TORCH_TARGET_VERSION is defined): `_C` (CPU kernels) and `_C_cuda` (CUDA kernels). SPARD_CHECK
// throws std::runtime_error (a RuntimeError in Python; the Python entry points give the typed
// error, see spard_ext/project.py). Appends for stable tensor types.
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#ifndef TORCH_TARGET_VERSION
#error "the kernels are built on the stable ABI: compile with -DTORCH_TARGET_VERSION=..."
#endif

#include <torch/csrc/stable/device.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

namespace spard {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, std::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);  // what an ostream prints by default
  s += buf;
}
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename Sizes>
void append_sizes(std::string& s, const Sizes& v) {  // "[2, 3]", as c10 prints sizes
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

inline void append(std::string& s, torch::headeronly::ScalarType v) { s += torch::headeronly::toString(v); }
inline void append(std::string& s, torch::headeronly::IntHeaderOnlyArrayRef v) { append_sizes(s, v); }
// As c10::Device prints: "cpu", "cuda:0", "meta".
inline void append(std::string& s, const torch::stable::Device& v) {
  using torch::headeronly::DeviceType;
  switch (v.type()) {
    case DeviceType::CPU: s += "cpu"; break;
    case DeviceType::CUDA: s += "cuda"; break;
    case DeviceType::Meta: s += "meta"; break;
    default: s += "device type " + std::to_string(static_cast<int>(v.type()));
  }
  if (v.index() >= 0) s += ":" + std::to_string(v.index());
}

}  // namespace detail

// The pieces, concatenated: strings, integers, doubles, devices, dtypes and shapes.
template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace spard

// A RuntimeError with a message made by spard::cat (evaluated only on failure).
#define SPARD_CHECK(cond, ...)                                                 \
  do {                                                                         \
    if (__builtin_expect(!(cond), 0)) throw std::runtime_error(::spard::cat(__VA_ARGS__)); \
  } while (0)
