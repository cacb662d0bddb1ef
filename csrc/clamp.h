// A clamp with torch's NaN rule, for the CPU and the CUDA kernels alike: v clamped to
// [lo, hi], and a NaN v kept NaN, as torch.clamp keeps it. Written as std::max then
// std::min are defined (a < b ? b : a), which keeps a NaN v and vectorises as they do;
// CUDA's fminf/fmaxf drop a NaN operand, so a NaN delta came out finite there and the
// projection moved every other entry of the image. A NaN bound (lo - x for a NaN image
// x) is the caller's to keep (linf_update: d = x != x ? x : d).
#pragma once

#ifdef __CUDACC__
#define CGIDM_HOST_DEVICE __host__ __device__
#else
#define CGIDM_HOST_DEVICE
#endif

namespace cgidm {

CGIDM_HOST_DEVICE inline float clamp_keep_nan(float v, float lo, float hi) {
  const float m = v < lo ? lo : v;  // std::max(v, lo)
  return hi < m ? hi : m;           // std::min(m, hi)
}

}  // namespace cgidm
