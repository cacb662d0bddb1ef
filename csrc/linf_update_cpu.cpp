// CPU kernel of cgidm::linf_update (semantics: cgidm.reference.linf_pgd_update_ref).
// Two parallel sweeps over fixed chunks of each image: whether the chunk's gradient is
// all finite (an image with a non-finite entry takes no step); then the sign step, the
// budget clip and the pixel-range clip, in the reference's order and fp32 arithmetic, so
// the result equals the reference's bit for bit (up to the sign of a zero).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "clamp.h"
#include "launch.h"

namespace cgidm::cpu {
namespace {

constexpr int64_t kChunk = 16384;
// Inner loops of a fixed trip count: -O2's cheap vectoriser takes them (no -O3 needed).
constexpr int64_t kLanes = 16;

template <typename F>
inline void in_lanes(int64_t j0, int64_t j1, F f) {
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) f(j + l);
  }
  for (; j < j1; ++j) f(j);
}

}  // namespace

void linf_update(
    const float* delta, const float* grad, const float* x, int64_t B, int64_t M, float alpha,
    float eps, float lo, float hi, float* delta_out, bool* skipped) {
  const int64_t chunks = (M + kChunk - 1) / kChunk;  // per image
  const int64_t items = B * chunks;
  auto range = [&](int64_t item) {
    const int64_t b = item / chunks, j0 = b * M + (item % chunks) * kChunk;
    return std::pair<int64_t, int64_t>{j0, std::min(j0 + kChunk, (b + 1) * M)};
  };

  std::vector<char> bad(items, 0);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [j0, j1] = range(item);
      int any = 0;
      // False for inf and NaN alike (std::isfinite would not vectorise).
      in_lanes(j0, j1, [&](int64_t j) { any |= !(std::fabs(grad[j]) <= FLT_MAX); });
      bad[item] = any != 0;
    }
  });
  std::vector<char> ok(B);
  for (int64_t b = 0; b < B; ++b) {
    bool any = false;
    for (int64_t c = 0; c < chunks; ++c) any |= bad[b * chunks + c] != 0;
    ok[b] = !any;
    skipped[b] = any;
  }

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [j0, j1] = range(item);
      const float a = ok[item / chunks] != 0 ? alpha : 0.0f;
      in_lanes(j0, j1, [&](int64_t j) {
        const float g = grad[j];
        // sign(g) * alpha: 0 for a zero entry (no step), +-alpha otherwise.
        float s = g > 0.0f ? a : 0.0f;
        s = g < 0.0f ? -a : s;
        float d = clamp_keep_nan(delta[j] + s, -eps, eps);
        // Clip to the room [lo - x, hi - x] left in the pixel range, never past the budget.
        const float xj = x[j];
        d = clamp_keep_nan(d, lo - xj, hi - xj);
        d = xj != xj ? xj : d;  // a NaN image entry: NaN, as the reference's torch.minimum gives
        delta_out[j] = d;
      });
    }
  });
}

}  // namespace cgidm::cpu
