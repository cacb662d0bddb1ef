// CPU kernel of cgidm::pair_noise (semantics: cgidm.reference.pair_noise_ref).
// Math in fp32 whatever the storage dtype; z is read once per image and feeds all K
// samples of both models.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <stdexcept>

#include "launch.h"

namespace cgidm::cpu {
namespace {

constexpr int64_t kChunk = 2048;

template <typename T>
void pair_noise_impl(
    const T* x0, const T* x, const T* mask, bool mask_batched, const T* noise_ft,
    const T* noise_pre, const float* sa, const float* sb, int64_t B, int64_t K, int64_t M,
    T* z, T* x_t) {
  const int64_t N = B * K;
  const T* n_pre = noise_pre ? noise_pre : noise_ft;
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    // z of one chunk in fp32, then one straight (vectorisable) loop per sample and model.
    float zf[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t i0 = (item % chunks) * kChunk, len = std::min(kChunk, M - i0);
      const T* x0b = x0 + b * M + i0;
      const T* xb = x + b * M + i0;
      const T* mb = mask + (mask_batched ? b * M : 0) + i0;
      T* zb = z + b * M + i0;
      for (int64_t i = 0; i < len; ++i) {
        const float m = static_cast<float>(mb[i]);
        zf[i] = static_cast<float>(x0b[i]) * m + static_cast<float>(xb[i]) * (1.0f - m);
        zb[i] = static_cast<T>(zf[i]);
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = b * K + k;
        const float a = sa[n], s = sb[n];
        const T* nf = noise_ft + n * M + i0;
        const T* np = n_pre + n * M + i0;
        T* out_ft = x_t + n * M + i0;
        T* out_pre = x_t + (N + n) * M + i0;
        for (int64_t i = 0; i < len; ++i) out_ft[i] = static_cast<T>(a * zf[i] + s * static_cast<float>(nf[i]));
        for (int64_t i = 0; i < len; ++i) out_pre[i] = static_cast<T>(a * zf[i] + s * static_cast<float>(np[i]));
      }
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
    case DType::kFloat16: throw std::invalid_argument("cgidm::cpu::pair_noise: fp16 is widened by the caller");
    case DType::kBFloat16: run(c10::BFloat16{}); break;
  }
}

}  // namespace cgidm::cpu
