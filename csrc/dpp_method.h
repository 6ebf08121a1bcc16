// The low-rank update dpp_greedy uses, shared by the CPU (stable ABI) and CUDA backends; free
// of torch so that both can include it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

namespace spard {

enum class DppMethod { kCholesky, kInverse };

// `method` is "cholesky", "inverse" or "auto" (checked by the caller). Per pick both pay N·D for
// the kernel row (or its direction); cholesky adds N·t for the update and N·k memory, inverse
// adds D² for the update of A, and needs eps > 0 (it starts from A = I / eps).
inline DppMethod resolve_dpp_method(const std::string& method, double eps, int64_t n, int64_t d, int64_t k) {
  if (method == "cholesky") return DppMethod::kCholesky;
  if (method == "inverse") return DppMethod::kInverse;
  const double dim = static_cast<double>(d);
  const bool inverse_cheaper = dim * dim <= 0.5 * static_cast<double>(n) * std::max<int64_t>(k, 1);
  return (eps > 0 && inverse_cheaper) ? DppMethod::kInverse : DppMethod::kCholesky;
}

}  // namespace spard
