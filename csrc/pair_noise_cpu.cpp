// CPU kernel of cgidm::pair_noise (semantics: cgidm.reference.pair_noise_ref).
// Math in fp32 whatever the storage dtype; z is read once per image and feeds all K
// samples of both models.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "launch.h"

namespace cgidm::cpu {
namespace {

constexpr int64_t kGrain = 4096;

template <typename T>
void pair_noise_impl(
    const T* x0, const T* x, const T* mask, bool mask_batched, const T* noise_ft,
    const T* noise_pre, const float* sa, const float* sb, int64_t B, int64_t K, int64_t M,
    T* z, T* x_t) {
  const int64_t N = B * K;
  at::parallel_for(0, B * M, kGrain, [&](int64_t begin, int64_t end) {
    // Walk [begin, end) image by image so the inner loop is a straight run.
    for (int64_t j0 = begin; j0 < end;) {
      const int64_t b = j0 / M;
      const int64_t j1 = std::min(end, (b + 1) * M);
      const int64_t i0 = j0 - b * M;
      const T* mk = mask + (mask_batched ? b * M : 0);
      for (int64_t i = i0; i < i0 + (j1 - j0); ++i) {
        const int64_t j = b * M + i;
        const float m = static_cast<float>(mk[i]);
        const float zf = static_cast<float>(x0[j]) * m + static_cast<float>(x[j]) * (1.0f - m);
        z[j] = static_cast<T>(zf);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t n = b * K + k;
          const int64_t e = n * M + i;
          x_t[e] = static_cast<T>(sa[n] * zf + sb[n] * static_cast<float>(noise_ft[e]));
          const float np = static_cast<float>(noise_pre ? noise_pre[e] : noise_ft[e]);
          x_t[N * M + e] = static_cast<T>(sa[n] * zf + sb[n] * np);
        }
      }
      j0 = j1;
    }
  });
}

}  // namespace

void pair_noise(
    DType dtype, const void* x0, const void* x, const void* mask, bool mask_batched,
    const void* noise_ft, const void* noise_pre, const float* sqrt_abar,
    const float* sqrt_one_minus_abar, int64_t B, int64_t K, int64_t M, void* z, void* x_t) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    pair_noise_impl<T>(
        static_cast<const T*>(x0), static_cast<const T*>(x), static_cast<const T*>(mask),
        mask_batched, static_cast<const T*>(noise_ft), static_cast<const T*>(noise_pre),
        sqrt_abar, sqrt_one_minus_abar, B, K, M, static_cast<T*>(z), static_cast<T*>(x_t));
  };
  switch (dtype) {
    case DType::kFloat32: run(float{}); break;
    case DType::kFloat16: run(c10::Half{}); break;
    case DType::kBFloat16: run(c10::BFloat16{}); break;
  }
}

}  // namespace cgidm::cpu
