// Device helpers shared by the .cu files: storage <-> fp32 conversion, block reductions,
// dtype dispatch. CUDA runtime headers only (see launch.h for why).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"

namespace cgidm::cuda_detail {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
// Fixed shuffle order: the same inputs give the same bits on every launch. Every thread of
// the block must call it (it has barriers), blockDim.x == kThreads.
// Shared memory, race-free by construction (compute-sanitizer --tool racecheck):
//  1. the first barrier: a previous call's threads may still be reading scratch[0], its
//     result, when this call's lane 0s write their warp sums;
//  2. the second: warp 0 reads the warp sums only after every warp has written its own;
//  3. only warp 0 reads them, and only its lane 0 then overwrites scratch[0], which no
//     other thread reads before the next barrier;
//  4. the last barrier: everyone reads the total after warp 0 wrote it.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, one block");
  constexpr int kWarps = kThreads / 32;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// Calls f(T{}) with T the CUDA storage type of `dtype`.
template <typename F>
void dispatch(cgidm::DType dtype, F f) {
  switch (dtype) {
    case cgidm::DType::kFloat32: f(float{}); break;
    case cgidm::DType::kFloat16: f(__half{}); break;
    case cgidm::DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace cgidm::cuda_detail
