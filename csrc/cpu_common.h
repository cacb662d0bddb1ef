// Helpers shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace cgidm::cpu {

// Sum of f(i) over [i0, i1) where f returns a square (and may store as a side effect).
// 16 independent fp32 lanes let the compiler vectorise without -ffast-math (no
// reassociation); lanes fold into a double every 1024 terms, which keeps the result
// accurate to ~1e-7 relative for any length.
template <typename F>
inline double lane_sum(int64_t i0, int64_t i1, F f) {
  constexpr int kLanes = 16;
  constexpr int64_t kFold = 1024;
  double total = 0.0;
  for (int64_t b = i0; b < i1; b += kFold) {
    const int64_t e = std::min(b + kFold, i1);
    float acc[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += f(i + l);
    }
    for (; i < e; ++i) acc[0] += f(i);
    for (int l = 0; l < kLanes; ++l) total += acc[l];
  }
  return total;
}

}  // namespace cgidm::cpu
