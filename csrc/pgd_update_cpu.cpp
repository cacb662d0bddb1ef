// CPU kernel of cgidm::pgd_update (semantics: cgidm.reference.pgd_update_ref).
// A "segment" is what one norm covers: one image (per_sample) or the whole batch. Three
// parallel sweeps over fixed chunks: gradient norm on the free entries; step + clamp +
// norm of the stepped delta (stored); projection + compose. Partial sums are added in a
// fixed order, so results do not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "clamp.h"
#include "cpu_common.h"
#include "launch.h"

namespace cgidm::cpu {
namespace {

constexpr int64_t kChunk = 8192;

struct Segments {
  int64_t count, length, chunks;  // chunks per segment
  int64_t items() const { return count * chunks; }
  int64_t begin(int64_t item) const {
    return (item / chunks) * length + (item % chunks) * kChunk;
  }
  int64_t end(int64_t item) const {
    return std::min(begin(item) + kChunk, (item / chunks + 1) * length);
  }
};

// Calls f(j0, j1, moff) on the runs of [begin, end) that lie inside one image: element j's
// mask entry is mask[j + moff], without a division per element.
template <typename F>
void for_runs(int64_t begin, int64_t end, int64_t M, bool mask_batched, F f) {
  for (int64_t j0 = begin; j0 < end;) {
    const int64_t b = j0 / M;
    const int64_t j1 = std::min(end, (b + 1) * M);
    f(j0, j1, mask_batched ? int64_t{0} : -b * M);
    j0 = j1;
  }
}

std::vector<double> sum_per_segment(const Segments& seg, const std::vector<double>& part) {
  std::vector<double> out(seg.count, 0.0);
  for (int64_t s = 0; s < seg.count; ++s) {
    for (int64_t c = 0; c < seg.chunks; ++c) out[s] += part[s * seg.chunks + c];
  }
  return out;
}

}  // namespace

void pgd_update(
    const float* delta, const float* grad, const float* x0, const float* x_init,
    const float* mask, bool mask_batched, int64_t B, int64_t M, float alpha, float eps,
    float clamp_min, float clamp_max, bool per_sample, float* delta_out, float* z) {
  const int64_t length = per_sample ? M : B * M;
  const Segments seg{per_sample ? B : 1, length, (length + kChunk - 1) / kChunk};
  std::vector<double> part(seg.items());

  at::parallel_for(0, seg.items(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      double s = 0.0;
      for_runs(seg.begin(item), seg.end(item), M, mask_batched,
               [&](int64_t j0, int64_t j1, int64_t moff) {
                 s += lane_sum(j0, j1, [&](int64_t j) {
                   const float gf = grad[j] * (1.0f - mask[j + moff]);
                   return gf * gf;
                 });
               });
      part[item] = s;
    }
  });
  std::vector<float> gnorm(seg.count);
  std::vector<bool> ok(seg.count);
  {
    const auto sums = sum_per_segment(seg, part);
    for (int64_t s = 0; s < seg.count; ++s) {
      gnorm[s] = static_cast<float>(std::sqrt(sums[s]));
      // NaN fails both tests: a non-finite gradient anywhere means no step.
      ok[s] = std::isfinite(gnorm[s]) && gnorm[s] > 0.0f;
    }
  }

  at::parallel_for(0, seg.items(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s_idx = item / seg.chunks;
      const bool step = ok[s_idx];
      const float norm = gnorm[s_idx];
      double s = 0.0;
      for_runs(seg.begin(item), seg.end(item), M, mask_batched,
               [&](int64_t j0, int64_t j1, int64_t moff) {
                 s += lane_sum(j0, j1, [&](int64_t j) {
                   const float gn = step ? grad[j] * (1.0f - mask[j + moff]) / norm : 0.0f;
                   const float xi = x_init[j];
                   const float d = clamp_keep_nan(xi + (delta[j] - alpha * gn), clamp_min, clamp_max) - xi;
                   delta_out[j] = d;
                   return d * d;
                 });
               });
      part[item] = s;
    }
  });
  std::vector<float> factor(seg.count);
  {
    const auto sums = sum_per_segment(seg, part);
    for (int64_t s = 0; s < seg.count; ++s) {
      const float dnorm = static_cast<float>(std::sqrt(sums[s]));
      factor[s] = dnorm > eps ? eps / std::max(dnorm, 1e-12f) : 1.0f;
    }
  }

  at::parallel_for(0, seg.items(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const float f = factor[item / seg.chunks];
      for_runs(seg.begin(item), seg.end(item), M, mask_batched,
               [&](int64_t j0, int64_t j1, int64_t moff) {
                 for (int64_t j = j0; j < j1; ++j) {
                   const float d = delta_out[j] * f;
                   const float m = mask[j + moff];
                   delta_out[j] = d;
                   z[j] = x0[j] * m + (x_init[j] + d) * (1.0f - m);
                 }
               });
    }
  });
}

}  // namespace cgidm::cpu
