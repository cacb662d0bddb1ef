// A clamp with torch's NaN rule, for the CPU and the CUDA kernels alike: v clamped to
// [lo, hi] (as min(max(v, lo), hi)), and NaN where v, lo or hi is NaN, as torch.clamp and
// torch.minimum/maximum give; fminf/fmaxf and std::min/max drop a NaN operand, so a NaN
// delta (or image) would come out finite and the projection would move every other entry.
// Nothing is built with fast-math (setup.py, CMakeLists.txt): x != x is the NaN test.
#pragma once

#ifdef __CUDACC__
#define CGIDM_HOST_DEVICE __host__ __device__
#else
#define CGIDM_HOST_DEVICE
#endif

namespace cgidm {

CGIDM_HOST_DEVICE inline float clamp_keep_nan(float v, float lo, float hi) {
  if (v != v || lo != lo || hi != hi) return v + lo + hi;  // NaN
  const float m = v < lo ? lo : v;
  return m > hi ? hi : m;
}

}  // namespace cgidm
