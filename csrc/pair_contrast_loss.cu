// CUDA kernel of cgidm::pair_contrast_loss (semantics: cgidm.reference.pair_contrast_loss_ref).
// One block per sample: one sweep writes both gradient seeds and reduces both squared
// errors in fp32, in a fixed order (no atomics: the loss is bit-reproducible, which CUDA
// graph replays are compared against).
#include "cuda_common.cuh"

namespace cgidm {
namespace {

using cuda_detail::to_f32;

constexpr int kThreads = 512;

template <typename E, typename Nz>
__global__ void __launch_bounds__(kThreads) pair_contrast_loss_kernel(
    const E* __restrict__ eps_ft, const E* __restrict__ eps_pre,
    const Nz* __restrict__ noise_ft, const Nz* __restrict__ noise_pre, int64_t M,
    float* __restrict__ loss, float* __restrict__ seed_ft, float* __restrict__ seed_pre) {
  __shared__ float scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * M;
  const Nz* n_pre = noise_pre ? noise_pre : noise_ft;
  const float scale = 2.0f / static_cast<float>(M);
  float s_ft = 0.0f, s_pre = 0.0f;
  for (int64_t i = base + threadIdx.x; i < base + M; i += kThreads) {
    const float d_ft = to_f32(eps_ft[i]) - to_f32(noise_ft[i]);
    const float d_pre = to_f32(eps_pre[i]) - to_f32(n_pre[i]);
    s_ft += d_ft * d_ft;
    s_pre += d_pre * d_pre;
    seed_ft[i] = d_ft * scale;
    seed_pre[i] = -d_pre * scale;
  }
  s_ft = cuda_detail::block_sum<kThreads>(s_ft, scratch);
  s_pre = cuda_detail::block_sum<kThreads>(s_pre, scratch);
  if (threadIdx.x == 0) loss[blockIdx.x] = s_ft / static_cast<float>(M) - s_pre / static_cast<float>(M);
}

template <typename E>
void launch(DType noise_dtype, const void* eps_ft, const void* eps_pre, const void* noise_ft,
            const void* noise_pre, int64_t N, int64_t M, float* loss, float* seed_ft,
            float* seed_pre, cudaStream_t stream) {
  auto run = [&](auto tag) {
    using Nz = decltype(tag);
    pair_contrast_loss_kernel<E, Nz><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        static_cast<const E*>(eps_ft), static_cast<const E*>(eps_pre),
        static_cast<const Nz*>(noise_ft), static_cast<const Nz*>(noise_pre), M, loss, seed_ft,
        seed_pre);
  };
  if (noise_dtype == DType::kFloat32) {
    run(float{});
  } else {
    run(E{});
  }
}

}  // namespace

namespace cuda {

int pair_contrast_loss(
    DType eps_dtype, DType noise_dtype, const void* eps_ft, const void* eps_pre,
    const void* noise_ft, const void* noise_pre, int64_t N, int64_t M, float* loss,
    float* seed_ft, float* seed_pre, void* stream) {
  cuda_detail::dispatch(eps_dtype, [&](auto tag) {
    launch<decltype(tag)>(noise_dtype, eps_ft, eps_pre, noise_ft, noise_pre, N, M, loss,
                          seed_ft, seed_pre, static_cast<cudaStream_t>(stream));
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace cgidm
