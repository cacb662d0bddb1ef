// CUDA kernel of cgidm::pair_noise (semantics: cgidm.reference.pair_noise_ref).
// One thread per latent entry of each image: x0, x and mask are read once and feed the
// image's K samples of both models. Math in fp32; grid-stride, so any size fits one launch.
#include <algorithm>

#include "cuda_common.cuh"

namespace cgidm {
namespace {

using cuda_detail::from_f32;
using cuda_detail::to_f32;

template <typename T>
__global__ void pair_noise_kernel(
    const T* __restrict__ x0, const T* __restrict__ x, const T* __restrict__ mask,
    bool mask_batched, const T* __restrict__ noise_ft, const T* __restrict__ noise_pre,
    const float* __restrict__ sa, const float* __restrict__ sb, int64_t B, int64_t K,
    int64_t M, T* __restrict__ z, T* __restrict__ x_t) {
  const int64_t N = B * K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < B * M; j += stride) {
    const int64_t b = j / M, i = j - b * M;
    const float m = to_f32(mask[mask_batched ? j : i]);
    const float zf = to_f32(x0[j]) * m + to_f32(x[j]) * (1.0f - m);
    z[j] = from_f32<T>(zf);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = b * K + k;
      const int64_t e = n * M + i;
      const float a = sa[n], s = sb[n];
      x_t[e] = from_f32<T>(a * zf + s * to_f32(noise_ft[e]));
      x_t[N * M + e] = from_f32<T>(a * zf + s * to_f32(noise_pre ? noise_pre[e] : noise_ft[e]));
    }
  }
}

}  // namespace

namespace cuda {

int pair_noise(
    DType dtype, const void* x0, const void* x, const void* mask, bool mask_batched,
    const void* noise_ft, const void* noise_pre, const float* sqrt_abar,
    const float* sqrt_one_minus_abar, int64_t B, int64_t K, int64_t M, void* z, void* x_t,
    void* stream) {
  constexpr int kThreads = 256;
  // Enough blocks to fill any current GPU several times over; the loop strides the rest.
  const int64_t blocks = std::min<int64_t>((B * M + kThreads - 1) / kThreads, 65536);
  cuda_detail::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    pair_noise_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x0), static_cast<const T*>(x), static_cast<const T*>(mask),
        mask_batched, static_cast<const T*>(noise_ft), static_cast<const T*>(noise_pre),
        sqrt_abar, sqrt_one_minus_abar, B, K, M, static_cast<T*>(z), static_cast<T*>(x_t));
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace cgidm
