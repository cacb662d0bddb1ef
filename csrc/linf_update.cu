// CUDA kernel of cgidm::linf_update (semantics: cgidm.reference.linf_pgd_update_ref).
// One block per image, two sweeps: whether the image's gradient is all finite (a block-wide
// OR, __syncthreads_or: no shared scratch, no atomics); then the sign step, the budget clip
// and the pixel-range clip, elementwise in the reference's order and fp32 arithmetic. No
// second launch, no host sync: safe in CUDA-graph capture. One SM per image; the update is
// a tiny part of a PGD step (a UNet forward and backward).
#include <cmath>

#include "clamp.h"
#include "cuda_common.cuh"

namespace cgidm {
namespace {

constexpr int kThreads = 1024;

__global__ void __launch_bounds__(kThreads) linf_update_kernel(
    const float* __restrict__ delta, const float* __restrict__ grad,
    const float* __restrict__ x, int64_t M, float alpha, float eps, float lo, float hi,
    float* __restrict__ delta_out, bool* __restrict__ skipped) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * M, end = begin + M;

  int bad = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) bad |= !isfinite(grad[j]);
  const bool step = __syncthreads_or(bad) == 0;
  if (threadIdx.x == 0) skipped[blockIdx.x] = !step;

  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const float g = grad[j];
    // sign(g) * alpha: 0 for a zero entry (no step), +-alpha otherwise.
    const float s = step ? (g > 0.0f ? alpha : (g < 0.0f ? -alpha : 0.0f)) : 0.0f;
    // __fadd_rn: never contracted with anything, as the reference's separate fp32 ops.
    float d = clamp_keep_nan(__fadd_rn(delta[j], s), -eps, eps);
    const float xj = x[j];
    d = clamp_keep_nan(d, __fsub_rn(lo, xj), __fsub_rn(hi, xj));
    d = xj != xj ? xj : d;  // a NaN image entry: NaN, as the reference's torch.minimum gives
    delta_out[j] = d;
  }
}

}  // namespace

namespace cuda {

int linf_update(
    const float* delta, const float* grad, const float* x, int64_t B, int64_t M, float alpha,
    float eps, float lo, float hi, float* delta_out, bool* skipped, void* stream) {
  linf_update_kernel<<<static_cast<unsigned>(B), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      delta, grad, x, M, alpha, eps, lo, hi, delta_out, skipped);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace cgidm
