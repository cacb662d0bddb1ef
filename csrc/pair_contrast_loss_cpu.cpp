// CPU kernel of cgidm::pair_contrast_loss (semantics: cgidm.reference.pair_contrast_loss_ref).
// One sweep writes both gradient seeds and per-chunk partial sums; the partials are added
// in a fixed order afterwards, so the loss does not depend on the thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "cpu_common.h"
#include "launch.h"

namespace cgidm::cpu {
namespace {

constexpr int64_t kChunk = 8192;

template <typename E, typename Nz>
void pair_contrast_loss_impl(
    const E* eps_ft, const E* eps_pre, const Nz* noise_ft, const Nz* noise_pre, int64_t N,
    int64_t M, float* loss, float* seed_ft, float* seed_pre) {
  const Nz* n_pre = noise_pre ? noise_pre : noise_ft;
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  std::vector<double> part_ft(N * chunks), part_pre(N * chunks);
  const float scale = 2.0f / static_cast<float>(M);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks;
      const int64_t i0 = n * M + (item % chunks) * kChunk;
      const int64_t i1 = std::min(i0 + kChunk, (n + 1) * M);
      part_ft[item] = lane_sum(i0, i1, [&](int64_t i) {
        const float d = static_cast<float>(eps_ft[i]) - static_cast<float>(noise_ft[i]);
        seed_ft[i] = d * scale;
        return d * d;
      });
      part_pre[item] = lane_sum(i0, i1, [&](int64_t i) {
        const float d = static_cast<float>(eps_pre[i]) - static_cast<float>(n_pre[i]);
        seed_pre[i] = -d * scale;
        return d * d;
      });
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    double s_ft = 0.0, s_pre = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      s_ft += part_ft[n * chunks + c];
      s_pre += part_pre[n * chunks + c];
    }
    loss[n] = static_cast<float>((s_ft - s_pre) / static_cast<double>(M));
  }
}

template <typename E>
void run_eps(DType noise_dtype, const void* eps_ft, const void* eps_pre, const void* noise_ft,
             const void* noise_pre, int64_t N, int64_t M, float* loss, float* seed_ft,
             float* seed_pre) {
  auto run = [&](auto tag) {
    using Nz = decltype(tag);
    pair_contrast_loss_impl<E, Nz>(
        static_cast<const E*>(eps_ft), static_cast<const E*>(eps_pre),
        static_cast<const Nz*>(noise_ft), static_cast<const Nz*>(noise_pre), N, M, loss,
        seed_ft, seed_pre);
  };
  if (noise_dtype == DType::kFloat32) {
    run(float{});
  } else {
    run(E{});
  }
}

}  // namespace

void pair_contrast_loss(
    DType eps_dtype, DType noise_dtype, const void* eps_ft, const void* eps_pre,
    const void* noise_ft, const void* noise_pre, int64_t N, int64_t M, float* loss,
    float* seed_ft, float* seed_pre) {
  switch (eps_dtype) {
    case DType::kFloat32:
      run_eps<float>(noise_dtype, eps_ft, eps_pre, noise_ft, noise_pre, N, M, loss, seed_ft, seed_pre);
      break;
    case DType::kFloat16:
      throw std::invalid_argument("cgidm::cpu::pair_contrast_loss: fp16 is widened by the caller");
    case DType::kBFloat16:
      run_eps<c10::BFloat16>(noise_dtype, eps_ft, eps_pre, noise_ft, noise_pre, N, M, loss, seed_ft, seed_pre);
      break;
  }
}

}  // namespace cgidm::cpu
