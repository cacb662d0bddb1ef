// CUDA kernel of cgidm::pgd_update (semantics: cgidm.reference.pgd_update_ref).
// One block per segment (an image, or the whole batch for the whole-tensor norm), three
// sweeps: gradient norm on the free entries; step + clamp + norm of the stepped delta
// (stored); projection + compose. No atomics, no second launch, no host sync.
// The whole-batch mode runs on one SM; the update is a tiny part of a PGD step.
#include <cmath>

#include "clamp.h"
#include "cuda_common.cuh"

namespace cgidm {
namespace {

constexpr int kThreads = 1024;

__global__ void __launch_bounds__(kThreads) pgd_update_kernel(
    const float* __restrict__ delta, const float* __restrict__ grad,
    const float* __restrict__ x0, const float* __restrict__ x_init,
    const float* __restrict__ mask, bool mask_batched, int64_t length, int64_t M, float alpha,
    float eps, float clamp_min, float clamp_max, float* __restrict__ delta_out,
    float* __restrict__ z) {
  __shared__ float scratch[32];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * length, end = begin + length;
  auto free_of = [&](int64_t j) { return 1.0f - mask[mask_batched ? j : j % M]; };

  float s = 0.0f;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const float gf = grad[j] * free_of(j);
    s += gf * gf;
  }
  const float norm = sqrtf(cuda_detail::block_sum<kThreads>(s, scratch));
  // NaN fails both tests: a non-finite gradient anywhere means no step.
  const bool ok = isfinite(norm) && norm > 0.0f;

  s = 0.0f;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const float gn = ok ? grad[j] * free_of(j) / norm : 0.0f;
    const float xi = x_init[j];
    const float d = clamp_keep_nan(xi + (delta[j] - alpha * gn), clamp_min, clamp_max) - xi;
    delta_out[j] = d;
    s += d * d;
  }
  const float dnorm = sqrtf(cuda_detail::block_sum<kThreads>(s, scratch));
  const float factor = dnorm > eps ? eps / fmaxf(dnorm, 1e-12f) : 1.0f;

  // Each thread reads back only the entries it stored itself: no barrier needed.
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const float d = delta_out[j] * factor;
    const float m = mask[mask_batched ? j : j % M];
    delta_out[j] = d;
    z[j] = x0[j] * m + (x_init[j] + d) * (1.0f - m);
  }
}

}  // namespace

namespace cuda {

int pgd_update(
    const float* delta, const float* grad, const float* x0, const float* x_init,
    const float* mask, bool mask_batched, int64_t B, int64_t M, float alpha, float eps,
    float clamp_min, float clamp_max, bool per_sample, float* delta_out, float* z,
    void* stream) {
  const unsigned blocks = per_sample ? static_cast<unsigned>(B) : 1u;
  pgd_update_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      delta, grad, x0, x_init, mask, mask_batched, per_sample ? M : B * M, M, alpha, eps,
      clamp_min, clamp_max, delta_out, z);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace cgidm
