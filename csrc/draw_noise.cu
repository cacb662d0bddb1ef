// CUDA kernel of cgidm::draw_noise (spec: cgidm/rng.py; reference: cgidm.rng.counter_draws).
// One thread per counter group of 4 latent entries, grid-stride; the step is read from
// device memory, so a captured graph draws whatever step its tensor holds at replay. No
// atomics, no host sync. logf/cosf/sinf/sqrtf are the IEEE-mode CUDA functions (this file
// must not be built with --use_fast_math); the Triton kernel calls the same libdevice ones.
#include "cuda_common.cuh"
#include "philox.h"

namespace cgidm {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) draw_noise_kernel(
    const int64_t* __restrict__ keys, const int64_t* __restrict__ step_ptr, int64_t N,
    int64_t K, int64_t M, int64_t J, int64_t total, int64_t t_min, int64_t span,
    int64_t* __restrict__ t, float* __restrict__ noise) {
  const uint32_t step = static_cast<uint32_t>(static_cast<uint64_t>(*step_ptr));
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t n = first; n < N; n += stride) {
    t[n] = philox::timestep_of(keys[n / K], step, n % K, K, t_min, span);
  }
  for (int64_t idx = first; idx < total; idx += stride) {
    const int64_t row = idx / J, j = idx % J;  // row = s*N + n
    const int64_t s = row / N, n = row % N;
    philox::noise_group(keys[n / K], step, static_cast<uint32_t>(n % K),
                        static_cast<uint32_t>(s), j, M, noise + row * M);
  }
}

}  // namespace

namespace cuda {

int draw_noise(
    const int64_t* keys, const int64_t* step, int64_t B, int64_t K, int64_t M, int64_t S,
    int64_t t_min, int64_t span, int64_t* t, float* noise, void* stream) {
  const int64_t N = B * K, J = (M + 3) / 4;
  const int64_t total = S * N * J;
  const int64_t work = total > N ? total : N;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;
  if (blocks < 1) blocks = 1;
  draw_noise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      keys, step, N, K, M, J, total, t_min, span, t, noise);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace cgidm
